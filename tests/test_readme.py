"""The README stays true: CI runs the very test command the README gives, and the Quick start
block runs as written."""
import re
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_gives_main_and_test_commands():
    main, tests = _commands()[:2]
    assert "python3 -m bench" in main
    assert "pytest" in tests


def test_ci_runs_the_readme_test_command_verbatim():
    _, tests = _commands()[:2]
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests.strip() in [line.strip() for line in ci_lines]


def _python_block(heading):
    text = (ROOT / "README.md").read_text()
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.+?)\n```", section, flags=re.S)[0]


def test_quick_start_runs_as_written():
    """The Quick start block, verbatim, with small stand-ins for the models it names (a
    torchvision-style ResNet with BatchNorm, one with GroupNorm): every line runs, and the
    model it ends with is converted, fused and synchronized."""
    import torch
    from torch import nn

    import normfuse
    from bench.resnet import BasicBlock, ResNet

    import timm_norm_act

    def resnet(norm_layer=None):
        return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, norm_layer=norm_layer)

    timm_models = []

    def create_model(name):  # a stand-in for timm's: its norm + act layer (tests/timm_norm_act.py)
        timm_models.append(nn.Sequential(nn.Conv2d(3, 8, 3),
                                         timm_norm_act.BatchNormAct2d(8, act_layer=nn.SiLU)))
        return timm_models[-1]

    scope = {"torchvision_resnet": resnet(),
             "gn_model": resnet(lambda c: nn.GroupNorm(32, c)),
             "timm": types.SimpleNamespace(create_model=create_model)}
    exec(compile(_python_block("## Quick start"), "README.md: Quick start", "exec"), scope)
    assert type(timm_models[0][1]) is normfuse.BatchInstanceNormAct2d
    model = scope["model"]
    norms = [m for m in model.modules() if isinstance(m, normfuse.SyncBatchInstanceNorm)]
    assert len(norms) == 12  # every BatchNorm of the model, synchronized
    assert any(m.activation == "relu" for m in norms)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    scope["opt"].step()
    assert all(float(m.gate.detach().max()) <= 1.0 for m in norms)
