import os
from pathlib import Path

# tiny test models run fastest on one thread; subprocesses (CLI, kill-and-resume) inherit it
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import groupseg  # noqa: E402

TESTS = Path(__file__).resolve().parent
LIBRARY = TESTS.parent / "groupseg"
SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CAMVID = SHARED / "camvid"
FLICKR = SHARED / "flickr8k"


def pytest_configure(config: pytest.Config) -> None:
    """``pytest tests`` (the whole folder) also collects the library's doctests (``--doctest-modules``)."""
    whole = any(Path(a.split("::")[0]).resolve() == TESTS for a in config.args)
    if whole and config.getoption("doctestmodules") and not any(Path(a).resolve() == LIBRARY for a in config.args):
        config.args.append(str(LIBRARY))


# fixtures that read the shared data: a test using one is marked needs_data
DATA_FIXTURES = {"camvid_image"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.needs_data)


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


def tiny_transformers_groupvit(path: Path, image_size: int = 64):
    """A perturbed tiny transformers ``GroupViTModel`` (eval mode), saved to ``path``."""
    from transformers import GroupViTConfig, GroupViTModel

    cfg = GroupViTConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2),
        vision_config=dict(hidden_size=32, intermediate_size=96, depths=[2, 1, 1], num_hidden_layers=4,
                           num_group_tokens=[8, 4, 0], num_output_groups=[8, 4, 4], num_attention_heads=2,
                           image_size=image_size, patch_size=8),
        projection_dim=16, projection_intermediate_dim=48,
    )
    torch.manual_seed(0)
    hf = perturb_(GroupViTModel(cfg)).eval()
    hf.save_pretrained(path)
    return hf
