"""Make the repository root importable, so tests can `import bpe` etc.; run every test in an empty folder."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The test models are tiny: two threads make them no faster, and two threads per
# process slow them to a crawl when processes share the two cores (the DDP and
# Ctrl-C tests start subprocesses, and CI machines may be busy).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def in_an_empty_folder(tmp_path_factory, monkeypatch):
    """Each test starts in a fresh empty folder: a default path (data/, out/) is never the repository's own,
    whatever a user has run there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
