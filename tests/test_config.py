import pytest
from conftest import run

from runtime import UserError, configure


def defaults():
    return {"n_layer": 12, "muon_lr": 0.02, "compile": True, "out_dir": "out/run", "_private": 1}


def test_file_then_command_line(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nn_layer = 4  # comment\nmuon_lr = 1  # an int is fine for a float\n")
    ns = defaults()
    config = configure(ns, [str(cfg), "--compile=false", "--out_dir=out/x"])
    assert config == {"n_layer": 4, "muon_lr": 1.0, "compile": False, "out_dir": "out/x"}
    assert configure(defaults(), ["--compile=false", "--compile"])["compile"] is True  # a bare flag is true
    assert ns["n_layer"] == 4 and isinstance(ns["muon_lr"], float)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n_layers=4"], "did you mean n_layer"),
        (["--n_layer=four"], "expected a int"),
        (["--compile=yes"], "expected a bool"),
        (["--n_layer"], "--key=value"),
        (["missing.py"], "not found"),
    ],
)
def test_command_line_rejections(argv, message):
    with pytest.raises(UserError, match=message):
        configure(defaults(), argv)


@pytest.mark.parametrize(
    "text, message",
    [
        ("n_layers = 4\n", "unknown config key 'n_layers'.*did you mean n_layer"),
        ("n_layer = '4'\n", "n_layer must be a int"),
        ("compile = 1\n", "compile must be a bool"),
        ("n_layer = 2.5\n", "n_layer must be a int"),
        ("n_layer = = 3\n", "failed to run"),
    ],
)
def test_config_file_rejections(tmp_path, text, message):
    cfg = tmp_path / "bad.py"
    cfg.write_text(text)
    with pytest.raises(UserError, match=message):
        configure(defaults(), [str(cfg)])


def test_script_reports_one_line_and_exits_nonzero():
    proc = run("train.py", "config/tiny_cpu.py", "--n_embed=64", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: unknown config key 'n_embed' in the command line; did you mean n_embd?"
    assert "Traceback" not in proc.stdout + proc.stderr


def test_shipped_configs_are_valid():
    for script, cfg in [("train.py", "config/tiny_cpu.py"), ("train.py", "config/pretrain_137m.py")]:
        proc = run(script, cfg, "--help")
        assert "--n_layer=" in proc.stdout


def test_every_config_value_says_why():
    """STYLE.md: configs are plain assignments, each with its comment (units, range or reason) on its line."""
    import ast

    from conftest import REPO

    bare = []
    for path in sorted((REPO / "config").glob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.parse(path.read_text()).body:
            assert isinstance(node, (ast.Assign, ast.AnnAssign)), f"{path.name}:{node.lineno} is not an assignment"
            if "  # " not in lines[node.lineno - 1]:
                bare.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1]}")
    assert not bare, "config values without a comment:\n" + "\n".join(bare)


def test_an_output_file_that_exists_may_be_replaced(tmp_path):
    """bench.py's results file and export.py's GGUF file are files a run replaces: the declaration accepts an existing
    one (a second `python bench.py` was refused before; export.py's own guard asks for --overwrite), not a folder, a
    path under a file or nothing; a run folder's path (writable) still cannot be an existing file."""
    from accepts import writable, writable_file

    existing = tmp_path / "bench.json"
    existing.write_text("{}")
    assert writable_file(str(existing)) and writable_file(str(tmp_path / "new" / "bench.json"))
    assert not any(writable_file(v) for v in (str(tmp_path), str(existing / "x.json"), "", None))
    assert not writable(str(existing)) and writable(str(tmp_path / "run"))


def test_a_number_that_defaults_to_auto():
    """prepare.py's near_dup: "auto" by default, a float when given one (not the text "0.7"), checked against its
    declaration; a bool key that defaults to auto (compile) still parses true/false."""
    from accepts import auto, between

    def namespace():
        return {
            "near_dup": "auto",
            "compile": "auto",
            "__annotations__": {"near_dup": auto | 0.0 | float & between(0.5, 0.95), "compile": auto | bool},
        }

    assert configure(namespace(), [])["near_dup"] == "auto"
    assert configure(namespace(), ["--near_dup=0.7", "--compile=false"]) == {"near_dup": 0.7, "compile": False}
    assert configure(namespace(), ["--near_dup=0"])["near_dup"] == 0.0
    assert configure(namespace(), ["--near_dup=auto"])["near_dup"] == "auto"
    with pytest.raises(UserError, match=r"near_dup=0.3: expected auto, or 0.0, or a number from 0.5 to 0.95"):
        configure(namespace(), ["--near_dup=0.3"])
    with pytest.raises(UserError, match=r"--near_dup=most: expected a float or auto$"):
        configure(namespace(), ["--near_dup=most"])
    with pytest.raises(UserError, match=r"--compile=1: expected a bool or auto$"):
        configure(namespace(), ["--compile=1"])


def test_a_key_type_is_stated_not_guessed():
    """Issue 35: a key's type was guessed from the literals in its declaration, so near_dup was a float only because
    `0.0` was among them: `auto | between(0.5, 0.95)` refused 0.7 (read as the text "0.7"). The type is now the one
    the declaration states, or the default's; an auto key that takes more than text and states no type is the
    script's mistake, said at once, never a refusal of the user's good value."""
    from accepts import at_least, auto, between, one_of

    def namespace(declared, default="auto"):
        return {"near_dup": default, "__annotations__": {"near_dup": declared}}

    assert configure(namespace(auto | float & between(0.5, 0.95)), ["--near_dup=0.7"]) == {"near_dup": 0.7}
    with pytest.raises(TypeError, match=r"near_dup defaults to auto and takes more than text: state its type"):
        configure(namespace(auto | between(0.5, 0.95)), ["--near_dup=0.7"])
    # an int key with a float among its literals stays an int, and a float key with an int literal a float
    assert type(configure(namespace(auto | 0.5 | int & at_least(1)), ["--near_dup=3"])["near_dup"]) is int
    assert configure(namespace(one_of(0) | between(0.5, 0.95), 0.7), ["--near_dup=0.6"]) == {"near_dup": 0.6}
    with pytest.raises(TypeError, match="two types"):
        auto | float & at_least(0) | int & at_least(1)
    with pytest.raises(TypeError, match="state its type"):  # nor are bools guessed from True and False
        configure(namespace(auto | one_of(True, False)), ["--near_dup=true"])
    with pytest.raises(TypeError, match="its default 1 is not of the type its declaration states, bool"):
        configure(namespace(bool & one_of(True, False), 1), [])


def test_an_empty_choice_is_shown_and_the_tokenizer_error_says_what_to_give(tmp_path):
    """An empty text among a key's choices is written "" (it was printed as nothing: `expected  or gpt2`), and
    prepare.py's --tokenizer error says what each choice means and that the path is missing, before any work."""
    from accepts import file, one_of

    assert one_of("", "gpt2").what == '"" or gpt2' and (one_of("") | file).what == '"", or a file that exists'
    assert one_of(0.0, True).what == "0.0 or True"
    missing = tmp_path / "pretrain_137m" / "tokenizer.model"
    proc = run("prepare.py", "--mode=sft", f"--tokenizer={missing}", f"--data_dir={tmp_path / 'd'}", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith(f'error: tokenizer={missing}: expected "" (train one), gpt2, or a tokenizer.model')
    assert "out/RUN/tokenizer.model" in proc.stderr and proc.stderr.endswith("; it does not exist\n")
    proc = run("prepare.py", "--mode=sft", "--tokenizer=gpt2", f"--data_dir={tmp_path / 'd'}", check=False)
    assert proc.returncode == 2 and proc.stderr == (
        "error: --mode=sft needs the base model's tokenizer: --tokenizer=out/RUN/tokenizer.model\n"
    )
    assert not (tmp_path / "d").exists()
