"""train.compile: a few CPU training steps of a tiny model compiled with inductor give the eager model's losses and
weights; the K-center sampler stays eager; checkpoints keep plain state dict keys; the moving average still works;
train.py end to end with compilation and activation checkpointing on."""
import json
import os
import shutil

import pytest
import torch

pytest.importorskip("av", reason="needs PyAV")  # train reads videos with it
pytest.importorskip("nvidia.dali", reason="needs NVIDIA DALI")

import train
from config import Config, config_from_dict
from test_checkpointing import small_model
from test_layer_decay_ema import Loader
from test_train import bare_trainer, clip_batch, demo_root, record_losses, run, write_config  # noqa: F401 (a fixture)

# inductor's CPU backend compiles C++; without a compiler it cannot run (not a failure of this project)
needs_compiler = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "g++")) is None,
                                    reason="torch.compile's inductor CPU backend needs a C++ compiler (g++)")


def trained(arch: str, compile: bool, grad_checkpointing: bool = False, steps: int = 3, traced: dict | None = None):
    """(per-step losses, Trainer) after `steps` optimizer steps of 2 micro-batches, with the moving average on.

    Args:
        traced: if given, gets for each call of the sampler and of the final norm whether dynamo was tracing it
            (a hook in a checkpointed block would itself break the graph: a side effect the recompute cannot replay)."""
    torch.manual_seed(0)
    batches = [clip_batch(2 * i, 2) for i in range(2 * steps)]
    torch.manual_seed(1)
    model = small_model(arch, depth=2, drop_path_rate=0.0)  # no draws: inductor's generator is not the eager one's
    model.set_grad_checkpointing(grad_checkpointing)
    tr = bare_trainer(model, Loader(batches), accum=2, model_ema=True, model_ema_decay=0.5, compile=compile)
    # plain SGD: Adam's first steps move a weight by +-lr whatever its gradient, so a gradient at rounding level
    # (a key bias's, which the softmax cancels) would move it by lr one way eager and the other way compiled
    tr.optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    tr.scheduler = train.build_schedule(tr.optimizer, tr.cfg, tr.steps_per_epoch)
    tr.ema, tr.best_top1 = train.build_ema(tr.model, tr.cfg), -1.0  # in the order of Trainer.__init__
    train.compile_model(tr.model, tr.cfg)
    for name, module in ((("sampler", model.sampler), ("norm", model.norm)) if traced is not None else ()):
        module.register_forward_pre_hook(lambda m, args, name=name: traced[name].append(torch.compiler.is_compiling()))
    losses = record_losses(tr)
    train.train_one_epoch(tr, 0, 0)
    return losses, tr


@pytest.mark.slow  # inductor's first compile of the graphs takes a minute on 2 cores (cached afterwards)
@needs_compiler
@pytest.mark.parametrize("arch,grad_checkpointing", [("vit", False), ("vit", True), ("timesformer", False),
                                                     ("motionformer", False)])
def test_compiled_training_steps_give_the_eager_losses_weights_and_average(arch, grad_checkpointing):
    eager_losses, eager = trained(arch, compile=False, grad_checkpointing=grad_checkpointing)
    traced = {"sampler": [], "norm": []}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    losses, tr = trained(arch, compile=True, grad_checkpointing=grad_checkpointing, traced=traced)
    assert len(losses) == len(eager_losses) == 6
    assert losses == pytest.approx(eager_losses, rel=1e-4, abs=1e-5)
    assert traced["sampler"] and not any(traced["sampler"])  # eager on every call
    assert any(traced["norm"])  # traced: the steps above ran compiled code
    assert not torch._dynamo.utils.counters["graph_break"]  # tokens -> logits in one graph, checkpointed or not

    state = tr.checkpoint_state(epoch=0, batch_in_epoch=0)
    assert list(state["model"]) == list(eager.model.state_dict())  # plain keys, no _orig_mod. prefix
    assert list(state["model_ema"]) == list(state["model"])
    for name, value in eager.model.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(state["model_ema"][name], eager.ema.module.state_dict()[name], rtol=1e-4,
                                   atol=1e-5, msg=name)
    assert not torch.equal(state["model_ema"]["head.weight"], state["model"]["head.weight"])  # it averaged


def test_the_config_key_is_off_by_default_and_typed():
    assert Config().train.compile is False
    assert config_from_dict({"train": {"compile": True}}).train.compile is True
    with pytest.raises(TypeError, match="train.compile must be bool"):
        config_from_dict({"train": {"compile": 1}})
    model = small_model("vit", depth=1)
    train.compile_model(model, Config())  # off: the model's own method
    assert model.forward_tokens.__func__ is type(model).forward_tokens


@pytest.mark.slow
@needs_compiler
def test_train_py_compiled_and_checkpointed_saves_plain_keys_and_eval_py_tests_it_eagerly(tmp_path, demo_root):
    out = tmp_path / "run"
    config = write_config(tmp_path, demo_root, out, train={"epochs": 1})
    result = run(["train.py", "--config", config, "train.compile=true", "model.grad_checkpointing=true",
                  "train.model_ema=true"], timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = torch.load(out / "last.pt", map_location="cpu", weights_only=True)
    plain = list(small_model("vit", depth=1).state_dict())  # the names of an eager model's weights
    assert list(ckpt["model"]) == list(ckpt["model_ema"]) == plain
    assert ckpt["config"]["train"]["compile"] and ckpt["config"]["model"]["grad_checkpointing"]
    assert json.loads((out / "results.json").read_text())["scored_videos"] == 8  # the test after training
    # eval.py with the config as it was before either was turned on: a training setting, not the model's function
    result = run(["eval.py", "--config", config, f"eval.out_dir={tmp_path / 'ev'}"], timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "ev" / "results.json").read_text())["scored_videos"] == 8
