"""The page's actions without a browser: bad input gives a message naming the file, and
nothing is written; an empty delta (the same file twice, an identical copy) is refused; an
existing file is replaced only with the page's "overwrite", and messages name that, not the
CLI's flag."""

import os
import shutil
from collections import namedtuple

import pytest

from deltasvd import ui_actions as actions
from deltasvd.delta_file import read_delta
from deltasvd.errors import DeltaError
from ui_pair import small_pair


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return small_pair(tmp_path_factory.mktemp("actions_pair"))


@pytest.fixture(scope="module")
def explorer(pair):
    return actions.analyse(*pair, "fp16")


def test_analysis_is_cached(pair, explorer):
    assert actions.analyse(*pair, "fp16") is explorer


def test_wrong_family_is_refused(pair, tmp_path):
    sd21_base, _ = small_pair(tmp_path, "sd21")
    with pytest.raises(DeltaError, match="famil"):
        actions.analyse(sd21_base, pair[1], "fp16")


def test_unreadable_file_names_it(pair, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(DeltaError) as e:
        actions.analyse(pair[0], str(junk), "fp16")
    assert "junk.safetensors" in str(e.value)
    with pytest.raises(DeltaError, match="not found"):
        actions.resolve("missing.safetensors", {}, "choose the base checkpoint",
                        "base checkpoint not found")


def test_save_writes_into_the_lora_folder(pair, explorer, tmp_path):
    preview = explorer.preview("energy", 0.5)
    path, summary = actions.save(*pair, preview, str(tmp_path), "deltas/x", "fp16")
    assert path == str(tmp_path / "deltas" / "x.safetensors")
    assert [r.rank for r in read_delta(path).records] == [r.rank for r in
                                                           preview.delta.records]
    assert "compression ratio" in summary
    os.utime(path, (1, 1))
    with pytest.raises(DeltaError, match="exists") as e:   # never replaced silently
        actions.save(*pair, preview, str(tmp_path), "deltas/x", "fp16")
    assert 'tick "overwrite"' in str(e.value) and "--overwrite" not in str(e.value)
    assert os.stat(path).st_mtime == 1
    actions.save(*pair, preview, str(tmp_path), "deltas/x", "fp16", overwrite=True)
    assert os.stat(path).st_mtime > 1


def test_a_file_appearing_meanwhile_is_named_in_the_pages_words(pair, explorer, tmp_path,
                                                                monkeypatch):
    def raced(base, tuned, out, *a, **k):
        raise DeltaError("output appeared while working (another run?); it was left as it "
                         "is (pass --overwrite to replace it)", out)
    monkeypatch.setattr(actions, "compress_files", raced)
    with pytest.raises(DeltaError, match='tick "overwrite"') as e:
        actions.save(*pair, explorer.preview("energy", 0.5), str(tmp_path), "d", "fp16")
    assert "--overwrite" not in str(e.value) and "d.safetensors" in str(e.value)


def test_an_empty_delta_is_refused(pair, tmp_path):
    """The same file twice, or an identical copy: nothing changed, no analysis to show."""
    with pytest.raises(DeltaError, match="same file"):
        actions.analyse(pair[0], pair[0], "fp16")
    copy = tmp_path / "copy.safetensors"
    shutil.copyfile(pair[0], copy)
    with pytest.raises(DeltaError, match="nothing changed"):
        actions.analyse(pair[0], str(copy), "fp16")
    assert not any(str(copy) in str(key) for key in actions._CACHE)


def test_numbers_name_both_kept_energies(explorer):
    preview = explorer.preview("energy", 0.5)
    text = actions.numbers(explorer, preview)
    assert "MiB" in text and "MB" not in text.replace("MiB", "")
    kept_s = float(text.split("kept energy, sum s")[1].split()[0])
    kept_fro = float(text.split("kept Frobenius, s^2")[1].split()[0])
    assert kept_s == pytest.approx(preview.kept, abs=1e-4)
    assert kept_fro == pytest.approx(1 - preview.rel_error ** 2, abs=1e-4)


@pytest.mark.parametrize("name", ["../escape", "/abs/path", ""])
def test_bad_names_are_refused(explorer, pair, tmp_path, name):
    with pytest.raises(DeltaError):
        actions.save(*pair, explorer.preview("energy", 0.5), str(tmp_path), name, "fp16")
    assert os.listdir(tmp_path) == []


def test_no_space_is_refused_before_writing(pair, explorer, tmp_path, monkeypatch):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(actions.shutil, "disk_usage", lambda p: usage(10, 10, 1000))
    with pytest.raises(DeltaError, match="not enough space"):
        actions.save(*pair, explorer.preview("energy", 0.5), str(tmp_path), "d", "fp16")
    assert os.listdir(tmp_path) == []


def test_disk_full_while_writing_leaves_nothing(pair, explorer, tmp_path, monkeypatch):
    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(actions, "compress_files", full)
    with pytest.raises(DeltaError, match="No space left"):
        actions.save(*pair, explorer.preview("energy", 0.5), str(tmp_path), "d", "fp16")


def test_inspect_and_resize(pair, explorer, tmp_path):
    path, _ = actions.save(*pair, explorer.preview("energy", 0.5), str(tmp_path), "a", "fp16")
    text, rows = actions.inspect(path)
    assert "energy = 0.5" in text and rows
    out, text = actions.resize(path, str(tmp_path), "b", "energy", 0.3)
    assert read_delta(out).info["mode"] == "energy"
    assert explorer.preview("energy", 0.3).file_bytes == pytest.approx(os.path.getsize(out),
                                                                       abs=2048)
    for overwrite in (False, True):   # never overwrite an input, ticked or not
        with pytest.raises(DeltaError, match="input"):
            actions.resize(path, str(tmp_path), "a", "energy", 0.2, overwrite)
    with pytest.raises(DeltaError, match='tick "overwrite"'):
        actions.resize(path, str(tmp_path), "b", "energy", 0.2)
    actions.resize(path, str(tmp_path), "b", "energy", 0.2, overwrite=True)
    assert read_delta(out).info["value"] == "0.2"
    with pytest.raises(DeltaError, match="not a deltasvd"):
        actions.inspect(pair[1])
