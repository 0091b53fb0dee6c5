from pathlib import Path

import pytest
import torch

import train as cli
import study
import vqvae


def test_defaults_yaml_flags_precedence(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("codebook_size: 64\nlr: 3e-3\nquantizer: ba_vq\n")
    cfg, _, _ = cli.parse(["--config", str(path), "--codebook_size", "128"])
    assert cfg.codebook_size == 128          # flag beats YAML
    assert cfg.lr == pytest.approx(3e-3)      # YAML's '3e-3' (a string to PyYAML) read as a float
    assert cfg.quantizer == "ba_vq"
    assert cfg.batch_size == vqvae.Config().batch_size  # default


def test_arch_presets_fill_empty_sizes():
    assert (vqvae.load_config().n_hid, vqvae.load_config().latent_dim) == (64, 64)
    cfg = vqvae.load_config(overrides=dict(arch="resnet"))
    assert (cfg.n_hid, cfg.latent_dim) == (128, 256)
    assert vqvae.load_config(overrides=dict(arch="resnet", latent_dim=32)).latent_dim == 32


def test_misspelt_yaml_key_names_the_nearest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("codebok_size: 64\n")
    with pytest.raises(vqvae.VQVAEError, match="'codebok_size'.*did you mean 'codebook_size'"):
        vqvae.load_config(path)


def test_misspelt_flag_names_the_nearest():
    with pytest.raises(vqvae.VQVAEError, match="--beta_strat.*did you mean '--beta_start'"):
        cli.parse(["--beta_strat", "1.0"])


def test_bool_flags():
    assert cli.parse(["--no_wandb"])[0].wandb is False
    assert cli.parse(["--wandb"])[0].wandb is True


@pytest.mark.parametrize("overrides,match", [
    (dict(codebook_size=0), "codebook_size must be ≥ 1"),
    (dict(quantizer="ba_vq", beta_start=0), "beta_start must be a finite number > 0"),
    (dict(quantizer="ba_vq", beta_end=-1.0), "beta_end must be a finite number > 0"),
    (dict(quantizer="ba_vq", ba_iters=0), "ba_iters must be ≥ 1"),
    (dict(batch_size=0), "batch_size must be ≥ 1"),
    (dict(lr=0), "lr must be a finite number > 0"),
    (dict(lr="nan"), "lr must be a finite number > 0"),
    (dict(quantizer="vq_emma"), "did you mean 'vq_ema'"),
    (dict(arch="resnt"), "did you mean 'resnet'"),
    (dict(dataset="cifar"), "did you mean 'cifar10'"),
    (dict(codebook_size="abc"), "codebook_size: expected int, got 'abc'"),
    (dict(ema_decay=1.0), r"ema_decay must be in \[0, 1\)"),
    (dict(device="gpu"), "device: unknown value 'gpu'"),
    (dict(grad_estimator="rotate"), "did you mean 'rotation'"),
    # an option of another quantizer is refused (at its default it is harmless and allowed)
    (dict(quantizer="ba_vq", grad_estimator="rotation"), "grad_estimator applies to vq_ema only, not to quantizer ba_vq"),
    (dict(beta_start=1.0), "beta_start applies to ba_vq only, not to quantizer vq_ema"),
    (dict(ba_eval="batch"), "ba_eval applies to ba_vq only"),
    (dict(quantizer="fsq", codebook_size=1000), "codebook_size applies to vq_ema, ba_vq only, not to quantizer fsq"),
    (dict(quantizer="fsq", commitment_weight=0.5), "commitment_weight applies to vq_ema, ba_vq only"),
    (dict(fsq_levels=[4, 4]), "fsq_levels applies to fsq only"),
    (dict(quantizer="fsq", fsq_levels=[8, 1]), "fsq_levels must list integers ≥ 2"),
    (dict(quantizer="fsq", fsq_levels="8,x"), "fsq_levels: expected a list of integers"),
    (dict(quantizer="ba_vq", ba_codebook_update="ema", codebook_weight=0.5), "codebook_weight weighs the codebook's gradient"),
    (dict(quantizer="ba_vq", ema_decay=0.9), "ema_decay applies to EMA codebooks"),
    (dict(quantizer="ba_vq", ba_output="hardd"), "did you mean 'hard_ste'"),
    (dict(dead_code_threshold=-1.0), "dead_code_threshold must be a finite number ≥ 0"),
    (dict(quantizer="ba_vq", dead_code_threshold=1.0), "dead_code_threshold needs an EMA codebook"),
    (dict(quantizer="ba_vq", ba_codebook_update="ema", dead_code_threshold=1.0, ba_reseed_prior="uniform"),
     "ba_reseed_prior uniform needs a prior to reset"),
    (dict(quantizer="ba_vq", ba_reseed_prior="reset"), "ba_reseed_prior: unknown value 'reset'"),
    (dict(beta_schedule="epoch"), "no longer has beta_schedule"),
])
def test_invalid_values_are_rejected(overrides, match):
    with pytest.raises(vqvae.VQVAEError, match=match):
        vqvae.load_config(overrides=overrides)


def test_reverse_annealing_is_allowed():
    """β_end < β_start: β falls along the same cosine, from 3 at the first step to 0.5 at the last."""
    quantizer = vqvae.make_quantizer(vqvae.load_config(overrides=dict(quantizer="ba_vq", beta_start=3.0, beta_end=0.5)))
    betas = []
    for step in range(11):
        quantizer.before_step(step, 11)
        betas.append(quantizer.beta)
    assert betas[0] == pytest.approx(3.0) and betas[-1] == pytest.approx(0.5)
    assert betas[5] == pytest.approx(1.75)                                      # halfway: the mean
    assert all(a > b for a, b in zip(betas, betas[1:]))                        # strictly falling


def refused_yaml(tmp_path, text: str, match: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(vqvae.VQVAEError, match=match):
        vqvae.load_config(path)


def test_yaml_that_is_not_a_mapping(tmp_path):
    refused_yaml(tmp_path, "- a\n- b\n", "must hold a mapping")


def test_missing_config_file(tmp_path):
    with pytest.raises(vqvae.VQVAEError, match="config file not found"):
        vqvae.load_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    assert vqvae.load_config(root / "config.yaml").arch == "resnet"
    assert vqvae.load_config(root / "config_mac.yaml").arch == "small"


@pytest.mark.parametrize("name", ["config.yaml", "config_mac.yaml"])
def test_shipped_configs_set_only_what_they_change(name):
    """Defaults live once, in Config: a shipped YAML restating a default would silently keep the
    old value when the default changes."""
    path = Path(__file__).resolve().parents[1] / name
    defaults = vqvae.dataclasses.asdict(vqvae.Config())
    restated = [k for k, v in vqvae.read_yaml(path).items() if vqvae._coerce(k, v, name) == defaults[k]]
    assert restated == [], f"{name} restates defaults: {restated}"


def test_docs_key_table_is_generated_from_config():
    page = (Path(__file__).resolve().parents[1] / "docs" / "config.md").read_text()
    assert cli.config_reference() in page, "regenerate the key table of docs/config.md with cli.config_reference()"


def test_every_key_is_a_flag_with_help():
    """--help shows, for every key, Config's own help text and its default: one source for both."""
    parser = cli.build_parser()
    for f in vqvae.dataclasses.fields(vqvae.Config):
        action = parser._option_string_actions[f"--{f.name}"]
        assert f.metadata["help"] in action.help and f"(default: {vqvae.DEFAULTS[f.name]})" in action.help, f.name


def test_nested_yaml_keys_are_refused(tmp_path):
    """The config is flat: a section such as `model:` is an unknown key, and a mapping is not a value."""
    refused_yaml(tmp_path, "seed: 1\nmodel:\n  arch: small\n", r"unknown config key 'model' in .*c\.yaml; config keys are flat")
    refused_yaml(tmp_path, "codebook_size:\n  value: 64\n", "codebook_size: holds a mapping .* config keys are flat")


def test_invalid_yaml_syntax_is_one_line(tmp_path):
    refused_yaml(tmp_path, "seed: 1\nquantizer: [ba_vq\n", r"c\.yaml:3:1: not valid YAML")


def test_old_value_names_and_retired_keys_of_saved_configs_still_load():
    """Saved runs wrote ba_output hard / ste and keys that no longer exist, at the values the code now always has."""
    saved = {"quantizer": "ba_vq", "ba_output": "ste", "beta_schedule": "step", "ba_prior_decay": 0.99, "ema_eps": 1e-5}
    assert vqvae.load_config(base=saved).ba_output == "hard_ste"
    assert vqvae.load_config(overrides={"quantizer": "ba_vq", "ba_output": "hard"}).ba_output == "hard_soft_grad"


def test_a_saved_config_keeps_only_its_own_quantizers_options():
    """A vq_ema run saved with ba_* keys set (a sweep's shared base) loads as the vq_ema run it was."""
    cfg = vqvae.load_config(base={"quantizer": "vq_ema", "ba_prior": "running", "ba_eval": "batch", "codebook_size": 64})
    assert (cfg.ba_prior, cfg.ba_eval, cfg.codebook_size) == ("uniform", "prior", 64)


def test_fsq_levels_come_as_a_list_from_yaml_or_the_command_line(tmp_path):
    (tmp_path / "c.yaml").write_text("quantizer: fsq\nfsq_levels: [8, 6, 5]\n")
    assert vqvae.load_config(tmp_path / "c.yaml").fsq_levels == [8, 6, 5]
    assert cli.parse(["--quantizer", "fsq", "--fsq_levels", "8,5,5,5"])[0].fsq_levels == [8, 5, 5, 5]


def test_unavailable_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(vqvae.VQVAEError, match="CUDA is not available"):
        vqvae.pick_device("cuda")


def test_docs_bad_input_table_names_tests_that_exist():
    """Every row of the bad-input table in docs/config.md points at tests that are really in the suite."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "config.md").read_text()
    table = page[page.index("## Bad input"):].split("\n## ")[0]             # up to the next section
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| input")]
    assert len(rows) >= 20
    for row in rows:
        named = re.findall(r"`(?:(test_\w+)::)?(test_\w+)`", row.split("|")[3])
        assert named, row
        module = None
        for file, test in named:
            module = file or module
            assert f"def {test}(" in (root / "tests" / f"{module}.py").read_text(), (module, test)
