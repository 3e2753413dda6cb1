"""The recording pass: ask a dataset with a model, record every token's routing, grade the answers.

Torch-free on import (the CLI lists its options without loading torch); the work is in ``run``, the engines
behind the ``generator`` interface (``hf_backend``, ``vllm_backend``), how they capture routing
(``capture``), ``prompting``, ``grading``, the LLM judge (``judge``) and ``compare``.
"""

# The LLM judge registers itself as the "judge" grader; importing it here makes it known to get_grader
# wherever the recorder is used (it loads no model, nor torch, on import).
from xici.recorder import judge as _judge  # noqa: F401

#: Model weight dtypes a recording can run in; "auto" picks per device.
DTYPES = ("auto", "float32", "bfloat16", "float16")
#: Engines a run can generate with: transformers (always there) or vLLM (the ``vllm`` extra). They write the
#: same lake; the backend is part of a run's key, since it changes the numerics.
BACKENDS = ("transformers", "vllm")
