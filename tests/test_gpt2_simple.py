"""gpt-2-simple's remaining names: download_gpt2 and a run moved between machines as one archive
(export/import), with hostile archives refused and nothing written."""

import hashlib
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from botkit import download_gpt2, load_gpt2
from botkit.cli import main
from botkit.errors import InputError, ModelLoadError
from botkit.model.run_archive import MANIFEST, import_run

FIXTURES = Path(__file__).parent / "fixtures" / "tf"


@pytest.fixture
def checkpoint(tmp_path):
    """A checkpoint folder holding gpt-2-simple's run1 (TensorFlow) as a user would have it."""
    shutil.copytree(FIXTURES / "run1", tmp_path / "checkpoint" / "run1")
    return tmp_path / "checkpoint"


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_download_gpt2_names_and_offline_sentence(tmp_path):
    with pytest.raises(
        ModelLoadError,
        match=r"Downloading 355M \(the hub's gpt2-medium\) needs the Hugging Face hub, "
        r"but HF_HUB_OFFLINE is set",
    ) as info:
        download_gpt2(str(tmp_path / "models"), "355M")
    assert str(info.value).count(". ") == 0 and not (tmp_path / "models" / "355M").exists()
    with pytest.raises(InputError, match="model_name must be one of '124M'"):
        download_gpt2(str(tmp_path / "models"), "2B")
    # OpenAI's own download is kept as it is, offline
    shutil.copytree(FIXTURES / "openai", tmp_path / "models" / "124M")
    assert download_gpt2(str(tmp_path / "models"), "124M") == str(tmp_path / "models" / "124M")
    lm = load_gpt2(model_name="124M", model_dir=str(tmp_path / "models"), device="cpu")
    assert lm.name == "124M" and lm.model.config.n_embd == 16


def test_export_import_round_trip(tmp_path, checkpoint, capsys):
    assert main(["export", "run1", str(tmp_path / "run1.tar.gz"), "--checkpoint-dir", str(checkpoint)]) == 0
    assert main(["import", str(tmp_path / "run1.tar.gz"), "--checkpoint-dir", str(tmp_path / "elsewhere")]) == 0
    assert tree(tmp_path / "elsewhere" / "run1") == tree(checkpoint / "run1")
    lm = load_gpt2(run_name="run1", checkpoint_dir=str(tmp_path / "elsewhere"), device="cpu")
    with torch.no_grad():
        out = lm.model(torch.tensor([json.loads((FIXTURES / "expected.json").read_text())["ids"]])).logits.numpy()
    assert np.abs(out - np.load(FIXTURES / "logits_run1.npy")).max() < 1e-5
    assert main(["import", str(tmp_path / "run1.tar.gz"), "--checkpoint-dir", str(tmp_path / "elsewhere")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (
        main(
            [
                "import",
                str(tmp_path / "run1.tar.gz"),
                "--checkpoint-dir",
                str(tmp_path / "elsewhere"),
                "--run-name",
                "run2",
            ]
        )
        == 0
    )
    assert tree(tmp_path / "elsewhere" / "run2") == tree(checkpoint / "run1")


def test_a_corrupted_archive_is_refused_and_leaves_nothing(tmp_path, checkpoint):
    archive = tmp_path / "run1.tar.gz"
    assert main(["export", str(checkpoint / "run1"), str(archive)]) == 0
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte inside the compressed weights
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"^run1.tar.gz .*nothing was written") as info:
        import_run(archive, tmp_path / "dest")
    # per file, or gzip's own CRC
    assert "does not match its checksum" in str(info.value) or "is damaged" in str(info.value)
    assert str(info.value).count(". ") == 0
    assert list((tmp_path / "dest").iterdir()) == []


def hostile(
    tmp_path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]], manifest_files: dict | None = None
) -> Path:
    """An archive written by hand: a manifest (listing `manifest_files`), then `members`."""
    path = tmp_path / "hostile.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        body = json.dumps({"format": 1, "run_name": "run1", "files": manifest_files or {}}).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
        for member in members:
            if isinstance(member, tarfile.TarInfo):
                tar.addfile(member)
            else:
                name, content = member
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tar.addfile(info, io.BytesIO(content))
    return path


def entry(content: bytes) -> dict:
    return {"size": len(content), "sha256": hashlib.sha256(content).hexdigest()}


def link(name: str, target: str, kind=tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize(
    ("members", "manifest", "says"),
    [
        ([("run1/../../evil.txt", b"x")], {"run1/../../evil.txt": entry(b"x")}, "outside the run's folder"),
        ([("/tmp/evil.txt", b"x")], {"/tmp/evil.txt": entry(b"x")}, "outside the run's folder"),
        ([("run1/../evil.txt", b"x")], {}, "which its manifest does not list"),
        (
            [link("run1/config.json", "/etc/passwd")],
            {"run1/config.json": entry(b"")},
            "which its manifest does not list as a file",
        ),
        (
            [link("run1/hard", "/etc/passwd", tarfile.LNKTYPE)],
            {"run1/hard": entry(b"")},
            "which its manifest does not list as a file",
        ),
        ([("run1/counter", b"4\n")], {"run1/counter": entry(b"3\n")}, "does not match its checksum"),
        (
            [("run1/counter", b"3\n")],
            {"run1/counter": entry(b"3\n"), "run1/hparams.json": entry(b"{}")},
            "run1/hparams.json is missing",
        ),
        (
            [("run1/counter", b"3\n" * 1000)],
            {"run1/counter": entry(b"3\n")},
            "has 2000 bytes, not the 2 of its manifest",
        ),
    ],
)
def test_hostile_archives_are_refused_and_write_nothing(tmp_path, members, manifest, says):
    archive = hostile(tmp_path, members, manifest)
    with pytest.raises(InputError, match=says) as info:
        import_run(archive, tmp_path / "dest")
    assert str(info.value).count(". ") == 0 and str(info.value).endswith(".")
    assert list((tmp_path / "dest").iterdir()) == []
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil.txt").exists()


def sparse(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.GNUTYPE_SPARSE  # a few header bytes that read as gigabytes of zeros
    return info


def manifest_archive(tmp_path: Path, body: bytes) -> Path:
    path = tmp_path / "hostile.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(body)
        tar.addfile(info, io.BytesIO(body))
    return path


@pytest.mark.parametrize(
    ("members", "manifest", "says"),
    [
        ([sparse("run1/weights")], {"run1/weights": entry(b"")}, "which its manifest does not list as a file"),
        (
            [("run1/a", b"good"), ("run1/./a", b"evil")],
            {"run1/a": entry(b"good"), "run1/./a": entry(b"evil")},
            "not written plainly",
        ),
        ([], {"run1/huge": {"size": 2**50, "sha256": "0" * 64}}, "files need 1,024.0 TiB and"),
        ([], {"": entry(b"")}, "outside the run's folder"),
        ([], {".": entry(b"")}, "outside the run's folder"),
        ([], {"run1/a": []}, "has no size and checksum"),
    ],
)
def test_more_hostile_archives_are_refused_in_one_sentence(tmp_path, members, manifest, says):
    test_hostile_archives_are_refused_and_write_nothing(tmp_path, members, manifest, says)


@pytest.mark.parametrize(
    "body", [b"[" * 100_000 + b"]" * 100_000, b'{"format": 1, "run_name": "run1", "files": ' + b"[" * 100_000]
)
def test_a_manifest_nested_deep_is_one_sentence(tmp_path, body):
    with pytest.raises(InputError, match="nothing was written") as info:
        import_run(manifest_archive(tmp_path, body), tmp_path / "dest")
    assert str(info.value).count(". ") == 0


def test_an_archive_is_checked_whole_before_any_file_is_written(tmp_path):
    good, bad = b"good bytes" * 1000, b"tampered"
    archive = hostile(
        tmp_path,
        [("run1/first", good), ("run1/second", bad)],
        {"run1/first": entry(good), "run1/second": entry(b"original")},
    )
    written = []

    def watch(event, args):  # every file opened for writing, as the interpreter itself reports it
        if (
            event == "open"
            and watching
            and isinstance(args[0], str)
            and args[1]
            and any(c in str(args[1]) for c in "wxa+")
        ):
            written.append(args[0])

    watching = True
    sys.addaudithook(watch)
    try:
        with pytest.raises(InputError, match="run1/second does not match its checksum"):
            import_run(archive, tmp_path / "dest")
    finally:
        watching = False
    assert not [p for p in written if "dest" in p]


def test_gpt2_simple_tar_without_a_manifest_is_one_sentence(tmp_path, checkpoint):
    with tarfile.open(tmp_path / "checkpoint_run1.tar", "w") as tar:  # what copy_checkpoint_to_gdrive writes
        tar.add(checkpoint / "run1", arcname="checkpoint/run1")
    with pytest.raises(
        InputError, match="does not start with botkit-archive.json .*extract it with tar and pass the folder to --model"
    ):
        import_run(tmp_path / "checkpoint_run1.tar", tmp_path / "dest")


def test_export_refuses_a_run_holding_a_link_instead_of_leaving_it_out(tmp_path, checkpoint):
    run = Path(shutil.copytree(checkpoint / "run1", tmp_path / "run1"))
    weights = next(p for p in run.iterdir() if p.name.startswith("model-") and ".data-" in p.name)
    outside = tmp_path / weights.name
    weights.rename(outside)
    weights.symlink_to(outside)  # to save space, say
    assert main(["export", str(run), str(tmp_path / "run1.tar.gz")]) == 2
    assert not (tmp_path / "run1.tar.gz").exists()
