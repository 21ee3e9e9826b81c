import os
from pathlib import Path

# tiny test models run fastest on one thread; subprocesses (CLI, kill-and-resume) inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import groupseg

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CAMVID = SHARED / "camvid"
FLICKR = SHARED / "flickr8k"


def perturb_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Random non-trivial weights (and BatchNorm statistics) so that mapping errors show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm1d):
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A perturbed tiny model saved in groupseg's own format."""
    torch.manual_seed(0)
    model = perturb_(groupseg.create_model("groupvit-tiny-test")).eval()
    d = tmp_path_factory.mktemp("weights") / "tiny"
    model.save_pretrained(d)
    return d


@pytest.fixture
def camvid_image() -> Path:
    if not (CAMVID / "val").is_dir():
        pytest.skip(f"CamVid not found at {CAMVID} (shared data absent)")
    return sorted((CAMVID / "val").glob("*.png"))[0]
