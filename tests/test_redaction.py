from autorule_lib.redaction import REPLACEMENT, redact, scrub_tree, secret_values


def test_secret_values_picks_known_and_lookalike_names():
    env = {"HF_TOKEN": "hf_abcdefghijk", "MY_SERVICE_API_KEY": "sk-123456789", "HOME": "/root", "WANDB_API_KEY": "x"}
    assert secret_values(env) == {"HF_TOKEN": "hf_abcdefghijk", "MY_SERVICE_API_KEY": "sk-123456789"}


def test_scrub_tree_redacts_and_reports(tmp_path):
    secrets = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMIK7MDENG"}
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "out.ipynb").write_text('{"text": "key=wJalrXUtnFEMIK7MDENG"}')
    (tmp_path / "clean.json").write_text("{}")
    hits = scrub_tree(tmp_path, secrets)
    assert hits == [f"{tmp_path / 'sub' / 'out.ipynb'}: AWS_SECRET_ACCESS_KEY"]
    assert "wJalr" not in (tmp_path / "sub" / "out.ipynb").read_text()
    assert REPLACEMENT in (tmp_path / "sub" / "out.ipynb").read_text()
    assert redact("a wJalrXUtnFEMIK7MDENG b", secrets) == f"a {REPLACEMENT} b"
