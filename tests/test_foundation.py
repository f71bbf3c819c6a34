"""The bundled tokenizer, the model loader and the import rules."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

from botkit.errors import ModelLoadError
from botkit.model.loading import gpt2_tokenizer, load_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("text", "ids"),
    [
        ("Hello world", [15496, 995]),
        (" Hello world", [18435, 995]),
        ("<|endoftext|>", [50256]),
        ("你好", [19526, 254, 25001, 121]),
    ],
)
def test_bundled_gpt2_tokenizer_gives_openai_ids(text, ids):
    tok = gpt2_tokenizer()
    assert tok(text).input_ids == ids
    assert tok.decode(ids) == text
    assert tok.eos_token_id == 50256 and tok.padding_side == "left"


def test_the_count_tokenizer_gives_the_same_ids_without_torch_or_transformers():
    code = (
        "import sys\nfrom botkit.model.tokenizer import count_tokenizer\n"
        "ids = [count_tokenizer().encode(t).ids for t in sys.argv[1:]]\n"
        "print(ids, 'torch' in sys.modules or 'transformers' in sys.modules)"
    )
    texts = ["Hello world", " Hello world", "<|endoftext|>", "你好", "a<|endoftext|>b  \n\n x 😀"]
    out = subprocess.run([sys.executable, "-c", code, *texts], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == f"{[gpt2_tokenizer()(t).input_ids for t in texts]} False", out.stderr


def test_loads_a_local_folder_without_tokenizer_files(tmp_path):
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    lm = load_model(tmp_path, device="cpu")
    assert lm.max_context == 64
    assert lm.tokenizer("Hello world").input_ids == [15496, 995]  # the bundled tokenizer stepped in
    assert not lm.model.training


def test_loads_a_run_directory(tmp_path):
    run = tmp_path / "checkpoint" / "run1"
    AutoModelForCausalLM.from_config(GPT2Config(n_layer=1, n_head=2, n_embd=16)).save_pretrained(run)
    assert load_model(run_name="run1", checkpoint_dir=tmp_path / "checkpoint").name == "run1"


@pytest.mark.parametrize(
    ("source", "run_name", "says"),
    [
        ("./no/such/model", None, "does not exist"),
        ("gpt2", None, "never downloaded"),  # HF_HUB_OFFLINE=1 in tests, and a fresh cache
        (None, "missing-run", "No trained model"),
    ],
)
def test_missing_models_get_one_sentence(tmp_path, source, run_name, says):
    with pytest.raises(ModelLoadError) as info:
        load_model(source, run_name=run_name, checkpoint_dir=tmp_path)
    message = str(info.value)
    assert says in message and message.endswith(".") and "\n" not in message


def test_random_model_from_config_is_seeded():
    config = GPT2Config(n_layer=1, n_head=2, n_embd=16)
    a, b = load_model(config, seed=1).model, load_model(config, seed=1).model
    assert all((p == q).all() for p, q in zip(a.parameters(), b.parameters(), strict=True))


PLATFORM_SDKS = {"discord", "telegram", "adapters", "botkit.adapters"}


def test_the_loaded_model_computes_what_plain_transformers_computes_bit_for_bit():
    lm = load_model(GPT2Config(n_layer=2, n_head=2, n_embd=64), device="cpu")  # its gelu_new is swapped (fuse_gelu)
    plain = GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=2, n_embd=64)).eval()
    plain.load_state_dict(lm.model.state_dict())
    ids = lm.tokenizer("The quick brown fox jumps over the lazy dog, again and again.", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(lm.model(ids).logits, plain(ids).logits)
    assert type(lm.model.transformer.h[0].mlp.act) is not type(plain.transformer.h[0].mlp.act)


def test_core_imports_no_platform_sdk():
    """STYLE.md: the core never imports a platform SDK; adapters never import each other."""
    offenders = []
    for path in (ROOT / "botkit").rglob("*.py"):
        if path.name == "cli.py":  # the composition root builds the adapters
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [
                f"{path.name}: {n}"
                for n in names
                if n.split(".")[0] in PLATFORM_SDKS or n.startswith("botkit.adapters")
            ]
    for path in (ROOT / "adapters").glob("*_adapter.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and "_adapter" in node.module:
                offenders.append(f"{path.name}: {node.module}")
    assert offenders == []


# Each layer folder may import the layers below it, never one above (STYLE.md): a chat message goes
# chat -> serve -> engine -> model; training sits beside serving and uses the engine (samples, the
# copy index) and the model. The modules at botkit's top level are the vocabulary every layer shares
# (errors, config, params, chat formats, banned words): they import only each other.
LAYERS = {"chat": 4, "serve": 3, "train": 3, "engine": 2, "model": 1}
COMPOSITION_ROOTS = {"cli.py", "__init__.py", "__main__.py"}


def botkit_imports(path: Path) -> list[str]:
    """Every botkit module `path` imports, lazily or not, as dotted names."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return [n for n in names if n == "botkit" or n.startswith("botkit.")]


def layer_of(dotted: str) -> str | None:
    """The layer folder of a botkit module ("botkit.serve.core" -> "serve"), None for the shared top level."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 2 and parts[1] in LAYERS else None


def may_import(here: str | None, there: str | None) -> bool:
    """Whether a module of layer `here` may import one of layer `there` (None: the shared top level)."""
    if there is None:
        return True
    return here is not None and (here == there or LAYERS[there] < LAYERS[here])


def test_imports_point_down_the_layers():
    offenders = []
    for path in sorted((ROOT / "botkit").rglob("*.py")):
        if path.parent.name == "botkit" and path.name in COMPOSITION_ROOTS:
            continue
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        offenders += [
            f"{module} -> {name}"
            for name in botkit_imports(path)
            if name.startswith("botkit.adapters") or not may_import(layer_of(module), layer_of(name))
        ]
    assert offenders == []


def test_the_layer_rule_refuses_imports_that_point_up_or_sideways():
    assert may_import("chat", "serve") and may_import("serve", "engine") and may_import("train", "model")
    assert may_import("engine", None) and may_import("model", "model")
    assert not may_import("engine", "serve") and not may_import("serve", "chat") and not may_import("model", "engine")
    assert not may_import("serve", "train") and not may_import("train", "serve") and not may_import(None, "model")
