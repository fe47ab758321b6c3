"""Suite-wide: GPU tests skip without CUDA (everything else runs on CPU), and the order and units of work that
`make test` hands its two pytest-xdist workers (`-n 2`)."""

import pytest

# Longest tiers first: the many short unit files fill the gaps at the end of a run on two workers.
TIER_ORDER = ("slurm", "distributed", "e2e", "bench", "gpu", "unit")


def tier_rank(item) -> int:
    name = item.path.parent.name
    return TIER_ORDER.index(name) if name in TIER_ORDER else len(TIER_ORDER)


def pytest_collection_modifyitems(config, items):
    import torch

    items.sort(key=tier_rank)
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs CUDA (run on the lent GPU)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """One unit of work per test file, so that a module-scoped run trains once on one worker; tests/slurm is a
    single unit, as its files share the one local cluster (and `cluster down` stops it). Units go out in
    collection order."""
    from xdist.scheduler import LoadScopeScheduling

    class FileScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/slurm" if path.startswith("tests/slurm/") else path

    config.option.loadscopereorder = False
    return FileScheduling(config, log)
