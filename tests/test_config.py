"""Config loading: YAML + dotted overrides, recipe defaults, one-line errors."""

import pytest

from sae_jax import config as C


def test_overrides_and_recipe_defaults(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  architecture: topk\n  d_sae: 256\ntrain:\n  steps: 100\n")
    cfg = C.load_config(path, ["model.d_sae=4096", "--optim.lr", "3e-4", "seed=3"])
    assert cfg.model.d_sae == 4096 and cfg.optim.lr == 3e-4 and cfg.seed == 3
    # topk recipe: k=32, no penalty, AuxK 1/32; explicit settings win.
    assert cfg.model.k == 32 and cfg.sparsity.penalty == "none" and cfg.model.aux_coefficient == 1 / 32
    assert cfg.optim.warmup_steps == 5  # 5% of train.steps


def test_architecture_alone_changes_recipe():
    jr = C.load_config(None, ["model.architecture=jumprelu"])
    assert (jr.sparsity.penalty, jr.optim.beta1, jr.model.jumprelu_eps) == ("l0", 0.0, 1e-2)
    assert jr.model.apply_b_dec_to_input is False
    gated = C.load_config(None, ["model.architecture=gated", "optim.beta1=0.5"])
    assert gated.optim.beta1 == 0.5 and gated.model.aux_coefficient == 1.0


def test_decoder_norm_penalty_recipe():
    cfg = C.load_config(None, ["sparsity.penalty=l1_decoder_norm"])
    assert cfg.model.init_decoder_norm == 0.1 and cfg.optim.grad_clip == 1.0


@pytest.mark.parametrize(
    "override, fragment",
    [
        (["model.dsae=5"], "unknown config key 'model.dsae'; did you mean 'model.d_sae'?"),
        (["trian.steps=5"], "did you mean 'train.steps'?"),
        (["model.d_sae=abc"], "config key 'model.d_sae' expects int, got 'abc'"),
        (["train.steps=1.5"], "config key 'train.steps' expects int"),
        (["model.architecture=topkk"], "did you mean 'topk'?"),
        (["optim.lr=-1"], "config key 'optim.lr' must be positive"),
        (["model.architecture=topk", "model.k=0"], "config key 'model.k' must be in 1..model.d_sae"),
        (["data.holdout_fraction=1.5"], "config key 'data.holdout_fraction' must be in [0, 1)"),
        (["model.architecture=jumprelu", "sparsity.penalty=l1"], "config key 'sparsity.penalty' must be one of l0"),
        (["model.d_sae"], "must look like key=value"),
    ],
)
def test_errors_are_one_clear_line(override, fragment):
    with pytest.raises(C.ConfigError) as e:
        C.load_config(None, override)
    msg = str(e.value)
    assert fragment in msg and "\n" not in msg


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  d_sea: 4\n")
    with pytest.raises(C.ConfigError, match="unknown config key 'model.d_sea' in '.*bad.yaml'; did you mean"):
        C.load_config(bad)
    with pytest.raises(C.ConfigError, match="does not exist"):
        C.load_config(tmp_path / "missing.yaml")
    (tmp_path / "broken.yaml").write_text("model: [\n")
    with pytest.raises(C.ConfigError, match="not valid YAML"):
        C.load_config(tmp_path / "broken.yaml")


def test_resolved_config_round_trips(tmp_path):
    cfg = C.load_config(None, ["model.architecture=batchtopk", "model.d_model=64"])
    C.save_config(cfg, tmp_path / "config.yaml")
    again = C.load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_with_d_model_fills_k_aux_but_keeps_explicit():
    cfg = C.load_config(None, ["model.architecture=topk"])
    assert C.with_d_model(cfg, 64).model.k_aux == 32
    cfg = C.load_config(None, ["model.architecture=topk", "model.k_aux=7"])
    assert C.with_d_model(cfg, 64).model.k_aux == 7


def test_every_field_is_documented():
    import inspect

    source = inspect.getsource(C)
    for key in C.all_keys():
        name = key.split(".")[-1]
        option = C.OPTIONS.get(name) if key.startswith("model.") else None  # documented by its architecture
        assert f"    {name}:" in source or key == "seed" or (option is not None and len(option[2]) > 20), key
