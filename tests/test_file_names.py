"""file_names: a model's file name from a URL, a server or a config, made safe to create and to show."""

from comfy_worker.config_schema import ModelEntry
from comfy_worker.file_names import MAX_NAME_BYTES, content_disposition_filename, safe_filename, url_filename


def test_file_names_come_from_content_disposition_and_never_carry_a_path():
    assert content_disposition_filename('attachment; filename="flux dev.safetensors"') == "flux dev.safetensors"
    assert content_disposition_filename("attachment; filename*=UTF-8''caf%C3%A9.ckpt; filename=x") == "café.ckpt"
    assert content_disposition_filename('attachment; filename="../../etc/passwd"') == "passwd"
    assert content_disposition_filename('attachment; filename="C:\\models\\a.pt"') == "a.pt"
    assert content_disposition_filename('attachment; filename="-rf"') is None
    assert content_disposition_filename("inline") is None
    assert url_filename("https://x.org/a/b/model%20v2.safetensors?download=1") == "model v2.safetensors"


def test_server_chosen_names_are_made_safe_and_short_enough():
    assert content_disposition_filename("attachment; filename*=UTF-8''evil%0AINFO%20x.safetensors") == (
        "evilINFO x.safetensors"
    )
    assert content_disposition_filename("attachment; filename*=UTF-8''%E2%80%AEcod.safetensors") == "cod.safetensors"
    assert content_disposition_filename('attachment; filename=".bashrc"') == "bashrc"
    assert content_disposition_filename('attachment; filename="x.part"') is None
    assert content_disposition_filename('attachment; filename="m.safetensors.lock"') is None
    long = safe_filename("é" * 120 + ".safetensors")
    assert long.endswith(".safetensors") and len(long.encode()) <= MAX_NAME_BYTES
    assert len((long + ".part.source.tmp").encode()) <= 255


def test_a_config_entry_without_filename_gets_the_same_safe_name():
    entry = ModelEntry(url="https://x.org/files/.bashrc", destination="loras")
    assert entry.url_filename() == "bashrc" == url_filename(entry.url)
    assert ModelEntry(url="https://x.org/", destination="loras").url_filename() == "download"
