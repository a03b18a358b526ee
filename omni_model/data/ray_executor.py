"""``data.executor: ray``: the data stages on a Ray cluster; the recipe through Data-Juicer's Ray executor.

Data-Juicer's ``RayExecutor`` (``executor_type: ray`` in the DJ config) attaches to the cluster and loads the input as
its ``RayDataset``; the recipe's ops then run through ``RayDataset.process`` (what ``RayExecutor.run`` calls) one op
at a time, so that the stage attributes every dropped sample to its op exactly as with the default executor
(``datajuicer.run_recipe`` owns that attribution for both executors; this module only supplies the per-op results).

* Filters and mappers: Data-Juicer's own Ray path. A filter's stats are computed in one pass and pulled to the driver
  (sample id + stats only) before it filters, so each drop gets its stats as the reason.
* Deduplicators: a decision on duplicates is global and ordered (the first occurrence is kept), which Data-Juicer's
  Ray dedup ops (``ray_document_deduplicator`` etc.) do not give: they keep whichever copy reaches a shared hash set
  first, decide on one modality, and do not say which sample a duplicate duplicates. So for any deduplicator, ours
  (media-aware) or Data-Juicer's, the per-sample work (``compute_hash``: text hashes, MinHash bands and the media
  fingerprints, i.e. the decoding) runs in Ray tasks, and the decision is the op's own ``process`` on the driver over
  the hash columns in input order: the same code, so the same kept set and the same "duplicate of" as the default
  executor. The driver holds the hash columns (and ids, media paths, stats), never the text or the records.

The shards stage's per-sample work runs through ``ray_map`` (ordered, bounded fan-out of a module-level function).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def ray_cluster(address: str | None, num_cpus: int):
    """Attach to the Ray cluster at ``address``, or with ``None`` start a local one of ``num_cpus`` CPUs (no
    dashboard) and stop it on exit. A session the caller already started is used as it is and left running.

    Ray (2.60) starts a local cluster with token authentication (token in ~/.ray/auth_token) and sets RAY_AUTH_MODE
    for the whole process; it is restored on exit. Attaching to an authenticated cluster by address needs
    RAY_AUTH_MODE=token and the cluster's token (RAY_AUTH_TOKEN or ~/.ray/auth_token) in the environment, as Ray
    documents: Ray does not enable it for an explicit address."""
    import ray

    started = False
    with restored_env("RAY_AUTH_MODE"):
        if not ray.is_initialized():
            common = {"logging_level": logging.WARNING, "configure_logging": False}
            if address:
                ray.init(address=address, **common)
            else:
                ray.init(num_cpus=int(num_cpus), include_dashboard=False, **common)
            started = True
        from ray.data import DataContext

        context, data_log = DataContext.get_current(), logging.getLogger("ray.data")
        saved = context.enable_progress_bars, data_log.level
        context.enable_progress_bars = False  # progress bars and per-dataset INFO lines in a Snakemake log are noise
        data_log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            context.enable_progress_bars = saved[0]
            data_log.setLevel(saved[1])
            if started:
                ray.shutdown()


@contextmanager
def restored_env(*names: str):
    """Put environment variables back as they were. Data-Juicer's ``init_configs`` sets RAY_JOB_ENV_VAR=1 for the
    whole process when ``executor_type`` is ray (later default-executor runs in the process would take Ray code
    paths), and a local ``ray.init`` sets RAY_AUTH_MODE."""
    saved = {name: os.environ.get(name) for name in names}
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class RayRecipeDataset:
    """The stage's dataset on Ray, with the per-op operations ``datajuicer.run_recipe`` drives (the same interface as
    its local counterpart). Rows are kept in input order on the driver's side by ``order`` (sample id -> position)."""

    def __init__(self, cfg, order: dict, id_key: str, bulky: tuple[str, ...] = ()):
        from data_juicer.core.executor.ray_executor import RayExecutor

        executor = RayExecutor(cfg)  # attaches to the running cluster (ray.init with ignore_reinit_error)
        self.dataset = executor.datasetbuilder.load_dataset()  # RayDataset
        self.order, self.id_key = order, id_key
        self.bulky = {cfg.text_keys, *bulky}  # columns a deduplicator's decision never reads: not pulled
        self._ids = [row[id_key] for row in self._pull_ordered([])]
        self._stats: dict = {}  # sample id -> its stats as last pulled

    # ------------------------------------------------------------------------------------------ helpers
    def _pull(self, columns: list[str]) -> list[dict]:
        return self.dataset.data.select_columns(columns).take_all()

    def _pull_ordered(self, columns: list[str]) -> list[dict]:
        rows = self._pull([self.id_key] + [c for c in columns if c != self.id_key])
        return sorted(rows, key=lambda row: self.order[row[self.id_key]])

    def _materialize(self) -> None:
        self.dataset.data = self.dataset.data.materialize()

    @contextmanager
    def _rollback(self):
        """An op that fails leaves the dataset as it was (run_recipe then finds the samples it fails on)."""
        saved = self.dataset.data, list(self._ids), dict(self._stats)
        try:
            yield
        except Exception:
            self.dataset.data, self._ids, self._stats = saved
            raise

    def keep(self, kept: set) -> None:
        import pyarrow as pa
        import pyarrow.compute as pc

        id_key, wanted = self.id_key, pa.array(sorted(kept), type=pa.string())

        def keep_batch(batch: pa.Table) -> pa.Table:
            return batch.filter(pc.is_in(batch[id_key], value_set=wanted))

        self.dataset.data = self.dataset.data.map_batches(keep_batch, batch_format="pyarrow", zero_copy_batch=True)
        self._materialize()
        self._ids = [sid for sid in self._ids if sid in kept]

    # ------------------------------------------------------------------------------------------ the per-op steps
    def ids(self) -> list[str]:
        return list(self._ids)

    def deduplicate(self, op):
        """Hashes on Ray, ``op.process`` on the driver. Returns (hashed: ids + hash columns in input order, pairs)."""
        with self._rollback():
            return self._deduplicate(op)

    def _deduplicate(self, op):
        from data_juicer.core.data import NestedDataset
        from datasets import Dataset

        before = set(self.dataset.data.columns())
        self.dataset.data = self.dataset.data.map_batches(_HashBatch(op), batch_format="pyarrow", batch_size=64)
        self._materialize()
        columns = [c for c in self.dataset.data.columns() if c not in self.bulky]
        added = [c for c in columns if c not in before]
        hashed = NestedDataset(Dataset.from_list(self._pull_ordered(columns)))
        deduplicated, pairs = op.process(hashed, show_num=len(hashed))
        dropped_columns = [c for c in added if c not in deduplicated.column_names]  # e.g. MinHash bands
        if dropped_columns:
            self.dataset.data = self.dataset.data.drop_columns(dropped_columns)
        self.keep(set(deduplicated[self.id_key]))
        return hashed, pairs

    def filter(self, op):
        """Data-Juicer's Ray filter path, stats first. Returns (stats before, stats after) in ``ids()`` order."""
        with self._rollback():
            return self._filter(op)

    def _filter(self, op):
        from functools import partial

        from data_juicer.core.data.ray_dataset import filter_batch
        from data_juicer.ops.base_op import DEFAULT_BATCH_SIZE
        from data_juicer.utils.constant import Fields

        ids = self.ids()
        self.dataset.process([op], stats_only=True)
        self._materialize()
        stats_after = {row[self.id_key]: row[Fields.stats] for row in self._pull([self.id_key, Fields.stats])}
        stats_before = [self._stats.get(sid) or {} for sid in ids]
        self._stats = stats_after
        # then the op's bounds as RayDataset applies them (a second process() would run compute_stats again: with
        # Data-Juicer's one-row batches for per-sample ops that doubles the op's cost)
        if op.is_batched_op():
            self.dataset.data = self.dataset.data.map_batches(partial(filter_batch, filter_func=op.process),
                                                              batch_format="pyarrow", zero_copy_batch=True,
                                                              batch_size=DEFAULT_BATCH_SIZE)
        else:
            self.dataset.data = self.dataset.data.filter(op.process)
        self._materialize()
        self._ids = [row[self.id_key] for row in self._pull_ordered([])]
        return stats_before, [stats_after[sid] for sid in ids]

    def apply(self, op) -> None:
        with self._rollback():
            self.dataset.process([op])
            self._materialize()
            self._ids = [row[self.id_key] for row in self._pull_ordered([])]

    def sample_errors(self, op) -> dict:
        """sample id -> the op's error on that sample alone (dj_ops.sample_error, in Ray tasks), for the samples
        it fails on."""
        checked = self.dataset.data.map_batches(_ErrorBatch(op, self.id_key), batch_format="pyarrow", batch_size=64)
        return {row["id"]: row["error"] for row in checked.take_all() if row["error"]}


class _ErrorBatch:
    """Ray map_batches function: (id, error or None) of the op's per-sample work on each row alone."""

    def __init__(self, op, id_key: str):
        self.op, self.id_key = op, id_key

    def __call__(self, batch):
        import pyarrow as pa

        from .dj_ops import sample_error

        rows = batch.to_pylist()
        return pa.table({"id": [row[self.id_key] for row in rows],
                         "error": pa.array([sample_error(self.op, row) for row in rows], type=pa.string())})


class _HashBatch:
    """Ray map_batches function: the deduplicator's ``compute_hash`` on every row of a pyarrow batch; appends the
    columns it adds (the input columns are passed through untouched, so their Arrow types do not change)."""

    def __init__(self, op):
        self.op = op

    def __call__(self, batch):
        import pyarrow as pa

        rows = batch.to_pylist()
        # a batch of one (dict of one-element lists): Data-Juicer's wrapper passes it through unambiguously
        hashed = [self.op.compute_hash({k: [v] for k, v in row.items()}) for row in rows]
        for name in [k for k in hashed[0] if k not in batch.column_names] if hashed else []:
            batch = batch.append_column(name, pa.array([h[name][0] for h in hashed]))
        return batch


def ray_map(fn, items: list, *, args: tuple = (), address: str | None = None, num_cpus: int = 1,
            chunk: int = 8):
    """``fn(chunk_of_items, *args) -> list of results`` over ``items`` in Ray tasks of ``chunk`` items each; yields
    the results one by one in input order. At most two tasks per cluster CPU are in flight, so the driver holds a
    bounded number of results whatever the input size. ``fn`` must be importable on the workers (a module-level
    function of this package); ``address``/``num_cpus`` as for ray_cluster."""
    from collections import deque

    import ray

    with ray_cluster(address, num_cpus):
        task = ray.remote(fn)
        window = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        pending: deque = deque()
        for start in range(0, len(items), chunk):
            if len(pending) >= window:
                yield from ray.get(pending.popleft())
            pending.append(task.remote(items[start:start + chunk], *args))
        while pending:
            yield from ray.get(pending.popleft())
