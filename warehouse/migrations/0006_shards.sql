-- Sharded token arrays (xici record/ablate --ray): each worker of a scaled-out run appends to its own shard of
-- the run's Zarr group, runs/<run_id>/shards/<shard>/, so that workers never write the same array. A sequence
-- names the shard its tokens are in; token_start is then an offset on that shard's token axis. NULL is the
-- run's own arrays (runs/<run_id>/), where a run recorded by one process keeps its tokens.

ALTER TABLE sequences ADD COLUMN shard INTEGER;
