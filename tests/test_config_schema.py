"""config_schema: the schema and what it rejects, YAML decoding (duplicate keys, bounded messages,
UTF-8) and CONFIG_YML decoding (docs/config-reference.md), plus the digest and the derived files
(config.schema.json, docs table)."""

import base64
import gzip
import json
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from support.comfy_process import ROOT

from comfy_worker import config_schema
from comfy_worker.config_schema import (
    DEFAULT_COMFYUI_REF,
    ConfigError,
    config_digest,
    decode_config_env,
    load_config,
    load_config_env,
    load_config_text,
    parse_config,
)

VALID = textwrap.dedent(
    """\
    # a comment
    comfyui:
      ref: v0.3.75
    models:
      - url: https://huggingface.co/org/repo/resolve/main/model.safetensors
        destination: checkpoints
        sha256: 3F1C000000000000000000000000000000000000000000000000000000000abc
      - url: https://civitai.com/api/download/models/12345
        destination: loras/wan
        filename: my_lora.safetensors
        optional: true
    nodes:
      - url: https://github.com/ltdrdata/ComfyUI-Manager.git
        version: latest
      - url: git@github.com:org/Other-Node.git
        version: 1a2b3c4
        name: other
        requirements: false
    """
)


def problems_of(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config_text(text)
    return info.value.problems


def one_model(**fields) -> str:
    entry = {"url": "https://example.com/files/model.safetensors", "destination": "checkpoints", **fields}
    return json.dumps({"models": [entry]})


def one_node(**fields) -> str:
    entry = {"url": "https://github.com/org/Node.git", **fields}
    return json.dumps({"nodes": [entry]})


# ---- a valid config ----


def test_valid_config_parses_with_defaults_and_normalisation():
    cfg = load_config_text(VALID)
    assert cfg.comfyui_ref() == "v0.3.75"
    hf, civitai = cfg.models
    assert hf.destination == "checkpoints" and hf.filename is None and hf.optional is False
    assert hf.sha256 == "3f1c" + "0" * 57 + "abc"  # normalised to lower case
    assert hf.planned_path() == "checkpoints/model.safetensors"
    assert civitai.destination == "loras/wan" and civitai.planned_path() == "loras/wan/my_lora.safetensors"
    manager, other = cfg.nodes
    assert manager.dir_name() == "ComfyUI-Manager" and manager.requirements is True
    assert other.dir_name() == "other" and other.version == "1a2b3c4"


def test_empty_sections_and_missing_comfyui_use_defaults():
    cfg = load_config_text("models:\nnodes:\n")
    assert cfg.models == [] and cfg.nodes == []
    assert cfg.comfyui_ref() == DEFAULT_COMFYUI_REF


def test_node_dir_name_from_each_url_kind():
    cases = {
        "https://github.com/org/ComfyUI-Foo.git": "ComfyUI-Foo",
        "https://github.com/org/ComfyUI-Foo/": "ComfyUI-Foo",
        "git@github.com:org/bar.git": "bar",
        "file:///srv/git/baz.git": "baz",
        "/srv/git/qux": "qux",
    }
    for url, expected in cases.items():
        assert load_config_text(json.dumps({"nodes": [{"url": url}]})).nodes[0].dir_name() == expected


def test_nested_destination_is_allowed_and_cleaned():
    cfg = load_config_text(one_model(destination="loras/wan/"))
    assert cfg.models[0].destination == "loras/wan"


def test_load_config_from_file(tmp_path):
    path = tmp_path / "config.yml"
    path.write_text(VALID)
    assert len(load_config(path).models) == 2


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yml")
    assert "cannot read" in info.value.problems[0] and "nope.yml" in info.value.problems[0]


# ---- every rejection of docs/config-reference.md, with the message text ----


def test_unknown_key_in_model_names_entry_and_suggests_the_right_key():
    (problem,) = problems_of(one_model(sha265="0" * 64))
    assert problem == (
        "models[0] (https://example.com/files/model.safetensors): unknown key 'sha265'; did you mean 'sha256'?"
    )


def test_unknown_key_in_node_and_at_top_level():
    assert problems_of(one_node(requirments=False)) == [
        "nodes[0] (https://github.com/org/Node.git): unknown key 'requirments'; did you mean 'requirements'?"
    ]
    assert problems_of("model:\n  - url: x\n") == ["config: unknown key 'model'; did you mean 'models'?"]
    assert problems_of("comfyui:\n  reff: v1\n") == ["comfyui: unknown key 'reff'; did you mean 'ref'?"]


def test_unknown_key_without_a_close_match_lists_the_allowed_keys():
    (problem,) = problems_of(one_node(zzz=1))
    assert problem.endswith("unknown key 'zzz'; allowed keys: url, version, name, optional, requirements")


@pytest.mark.parametrize("field", ["destination", "filename"])
def test_dot_dot_in_model_paths_is_rejected(field):
    (problem,) = problems_of(one_model(**{field: "../../etc/passwd" if field == "destination" else "../x"}))
    assert problem.startswith(
        f"models[0] (https://example.com/files/model.safetensors): {field}: must not contain '..'"
    )


def test_dot_dot_and_absolute_in_node_name_are_rejected():
    (problem,) = problems_of(one_node(name=".."))
    assert problem.startswith("nodes[0] (https://github.com/org/Node.git): name: must not contain '..'")
    (problem,) = problems_of(one_node(name="/tmp/x"))
    assert "name: must be a relative path, not an absolute one ('/tmp/x')" in problem


@pytest.mark.parametrize("field,value", [("destination", "/models/checkpoints"), ("filename", "/x.safetensors")])
def test_absolute_model_paths_are_rejected(field, value):
    (problem,) = problems_of(one_model(**{field: value}))
    assert f"{field}: must be a relative path, not an absolute one" in problem


def test_filename_must_be_a_plain_name():
    (problem,) = problems_of(one_model(filename="sub/x.safetensors"))
    assert "filename: must be a plain name without '/'" in problem


def test_url_beginning_with_dash_is_rejected_for_models_and_nodes():
    (problem,) = problems_of(json.dumps({"models": [{"url": "-oProxyCommand=x", "destination": "vae"}]}))
    assert problem == (
        "models[0] (-oProxyCommand=x): url: must not begin with '-' ('-oProxyCommand=x' would be read as a "
        "command-line option)"
    )
    (problem,) = problems_of(json.dumps({"nodes": [{"url": "--upload-pack=touch /tmp/x"}]}))
    assert problem.startswith("nodes[0] (--upload-pack=touch /tmp/x): url: must not begin with '-'")


@pytest.mark.parametrize(
    "section,url",
    [
        ("models", "https://user:hunter2secret@example.com/m.safetensors"),
        ("models", "https://hunter2secret@example.com/m.safetensors"),
        ("nodes", "https://x-access-token:hunter2secret@github.com/org/private-node.git"),
        ("nodes", "ssh://git:hunter2secret@example.com/org/node.git"),
    ],
)
def test_credentials_in_urls_are_rejected_without_being_echoed(section, url):
    entry = {"url": url, "destination": "vae"} if section == "models" else {"url": url}
    (problem,) = problems_of(json.dumps({section: [entry]}))
    assert problem.startswith(f"{section}[0] (") and "url: must not contain" in problem
    assert "hunter2secret" not in problem


def test_ssh_user_without_password_is_a_normal_git_url():
    cfg = load_config_text(one_node(url="ssh://git@example.com/org/node.git"))
    assert cfg.nodes[0].dir_name() == "node"


def test_version_beginning_with_dash_is_rejected():
    (problem,) = problems_of(one_node(version="--upload-pack=evil"))
    assert problem.startswith("nodes[0] (https://github.com/org/Node.git): version: must not begin with '-'")


def test_model_url_must_be_http():
    (problem,) = problems_of(one_model(url="ftp://example.com/a.bin"))
    assert "url: must be an http(s) URL, not 'ftp://example.com/a.bin'" in problem


def test_bad_sha256_hex_is_rejected():
    (problem,) = problems_of(one_model(sha256="xyz"))
    assert problem == (
        "models[0] (https://example.com/files/model.safetensors): sha256: must be 64 hexadecimal digits "
        "(got 3 characters: 'xyz'); `sha256sum FILE` prints it"
    )
    (problem,) = problems_of(one_model(sha256="g" * 64))
    assert "sha256: must be 64 hexadecimal digits" in problem


def test_duplicate_model_target_paths_are_rejected():
    text = json.dumps(
        {
            "models": [
                {"url": "https://a.example/x/model.safetensors", "destination": "checkpoints"},
                {
                    "url": "https://b.example/y/other.bin",
                    "destination": "checkpoints/",
                    "filename": "model.safetensors",
                },
            ]
        }
    )
    assert problems_of(text) == [
        "models[1] (https://b.example/y/other.bin): destination/filename: target models/checkpoints/model.safetensors "
        "is already used by models[0]; give one of them another filename or destination"
    ]


def test_duplicate_node_directories_are_rejected():
    text = json.dumps({"nodes": [{"url": "https://github.com/a/Node.git"}, {"url": "https://gitlab.com/b/Node"}]})
    assert problems_of(text) == [
        "nodes[1] (https://gitlab.com/b/Node): name: directory custom_nodes/Node is already used by nodes[0]; "
        "set a different 'name'"
    ]


def test_duplicates_are_reported_together_with_other_problems():
    text = json.dumps(
        {
            "models": [
                {"url": "https://a.example/m.bin", "destination": "vae"},
                {"url": "https://b.example/m.bin", "destination": "vae"},
                {"url": "https://c.example/n.bin", "destination": "/abs"},
            ]
        }
    )
    problems = problems_of(text)
    assert len(problems) == 2
    assert any("destination: must be a relative path" in p for p in problems)
    assert any("already used by models[0]" in p for p in problems)


def test_missing_required_fields_and_wrong_types():
    problems = problems_of(json.dumps({"models": [{"url": "https://x.example/a.bin"}], "nodes": [{"version": "v1"}]}))
    assert "models[0] (https://x.example/a.bin): field 'destination' is required" in problems
    assert "nodes[0]: field 'url' is required" in problems
    (problem,) = problems_of(one_model(optional="sometimes"))
    assert problem.startswith("models[0] (https://example.com/files/model.safetensors): optional: ")


def test_every_problem_is_reported_at_once():
    text = json.dumps(
        {
            "models": [{"url": "-x", "destination": "../y", "sha256": "1"}],
            "nodes": [{"url": "https://github.com/o/n", "version": "-v"}],
        }
    )
    assert len(problems_of(text)) == 4


def test_top_level_must_be_a_mapping_and_yaml_errors_give_the_line():
    assert problems_of("- a\n- b\n") == ["the top level must be a mapping with models/nodes/comfyui, not list"]
    (problem,) = problems_of("models:\n  - url: [unclosed\n")
    assert problem.startswith("not valid YAML at line 3")


# ---- CONFIG_YML ----

SMALL = "models:\n  - url: https://example.com/a/b.safetensors\n    destination: vae\n"


def b64(text: str, alphabet: str = "standard") -> str:
    raw = text.encode()
    return (base64.urlsafe_b64encode(raw) if alphabet == "urlsafe" else base64.b64encode(raw)).decode()


def test_config_yml_plain_yaml_is_used_as_is():
    assert decode_config_env(SMALL) == SMALL
    assert load_config_env(SMALL).models[0].destination == "vae"


def test_config_yml_base64_standard():
    assert decode_config_env(b64(SMALL)) == SMALL


def test_config_yml_base64_url_safe_alphabet():
    text = SMALL + "# ??>>??>>~~~\n"  # bytes that encode to '+' and '/' in the standard alphabet
    assert "+" in b64(text) or "/" in b64(text)
    encoded = b64(text, "urlsafe")
    assert "-" in encoded or "_" in encoded
    assert decode_config_env(encoded) == text


def test_config_yml_base64_without_padding():
    encoded = b64(SMALL + "#x\n")
    assert encoded.endswith("=")
    assert decode_config_env(encoded.rstrip("=")) == SMALL + "#x\n"


def test_config_yml_base64_wrapped_in_newlines_and_spaces():
    encoded = b64(SMALL)
    wrapped = "\n  " + "\n".join(encoded[i : i + 20] for i in range(0, len(encoded), 20)) + "\n\n"
    assert decode_config_env(wrapped) == SMALL


def test_config_yml_garbage_is_a_clear_error():
    with pytest.raises(ConfigError) as info:
        decode_config_env("this is not %% a config!")
    assert info.value.source == "CONFIG_YML"
    assert info.value.problems == [
        "the value is neither a YAML mapping (models:/nodes:) nor valid base64 of one; "
        "encode the file with `base64 -w0 config.yml`"
    ]


def test_config_yml_base64_of_something_that_is_not_a_config():
    with pytest.raises(ConfigError) as info:
        decode_config_env(b64("just a sentence"))
    assert "decodes from base64 but the result is not a config" in info.value.problems[0]
    assert "it is a str" in info.value.problems[0]


def test_config_yml_base64_of_binary_is_a_clear_error():
    with pytest.raises(ConfigError) as info:
        decode_config_env(base64.b64encode(bytes(range(256))).decode())
    assert "neither a YAML mapping" in info.value.problems[0]


def test_config_yml_base64_of_an_invalid_config_reports_the_entry():
    with pytest.raises(ConfigError) as info:
        load_config_env(b64("models:\n  - url: https://x.example/a.bin\n    destination: ../up\n"))
    assert info.value.source == "CONFIG_YML"
    assert info.value.problems[0].startswith("models[0] (https://x.example/a.bin): destination: must not contain '..'")


# ---- digest ----

BASE = load_config_text(VALID)


def digest_of(text: str) -> str:
    return config_digest(load_config_text(text))


def test_digest_ignores_comments_whitespace_and_key_order():
    reordered = textwrap.dedent(
        """\
        nodes:
          - version: latest
            url:   https://github.com/ltdrdata/ComfyUI-Manager.git     # the manager
          - {name: other, url: "git@github.com:org/Other-Node.git", requirements: false, version: 1a2b3c4}

        models:
          - destination: checkpoints
            sha256: 3f1c000000000000000000000000000000000000000000000000000000000abc
            url: https://huggingface.co/org/repo/resolve/main/model.safetensors
          - filename: my_lora.safetensors
            optional: true
            destination: loras/wan
            url: https://civitai.com/api/download/models/12345
        comfyui: {ref: v0.3.75}
        """
    )
    assert digest_of(reordered) == config_digest(BASE)


def test_digest_ignores_default_values_written_out():
    explicit = VALID.replace(
        "        destination: checkpoints\n", "        destination: checkpoints\n        optional: false\n"
    )
    explicit = explicit.replace(
        "    version: latest\n", "    version: latest\n    optional: false\n    requirements: true\n"
    )
    assert explicit != VALID
    assert digest_of(explicit) == config_digest(BASE)
    assert digest_of("models: []\n") == digest_of("comfyui:\n  ref: v0.3.75\n")


@pytest.mark.parametrize(
    "old,new",
    [
        ("destination: checkpoints", "destination: unet"),
        ("optional: true", "optional: false"),
        ("version: latest", "version: nightly"),
        ("requirements: false", "requirements: true"),
        ("ref: v0.3.75", "ref: v0.3.76"),
        ("3F1C", "3F1D"),
        ("models/12345", "models/12346"),
        ("name: other", "name: other2"),
    ],
)
def test_digest_changes_with_any_real_value(old, new):
    assert old in VALID
    assert digest_of(VALID.replace(old, new)) != config_digest(BASE)


def test_digest_covers_the_effective_comfyui_ref():
    assert config_digest(BASE, comfyui_ref="v0.3.76") != config_digest(BASE)
    assert config_digest(BASE, comfyui_ref="v0.3.75") == config_digest(BASE)


# ---- derived files ----


def test_committed_json_schema_is_current():
    assert config_schema.SCHEMA_PATH.read_text() == config_schema.json_schema_text(), (
        "config.schema.json is stale: run `python -m comfy_worker.config_schema --write`"
    )


def test_docs_table_is_current_and_lists_every_field():
    doc = config_schema.DOCS_PATH.read_text()
    assert config_schema.docs_with_table(doc) == doc, (
        "docs/config-reference.md is stale: run `python -m comfy_worker.config_schema --write`"
    )
    for field in ("url", "destination", "filename", "sha256", "optional", "version", "name", "requirements"):
        assert f"`models[].{field}`" in doc or f"`nodes[].{field}`" in doc


def test_json_schema_rejects_unknown_keys_like_the_loader():
    schema = config_schema.json_schema()
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["ModelEntry"]["additionalProperties"] is False
    assert schema["$defs"]["ModelEntry"]["required"] == ["url", "destination"]


# ---- YAML decoding: duplicate keys, bounded messages, UTF-8, numbers that must be quoted ----


def test_duplicate_keys_are_rejected_with_both_line_numbers_at_any_depth():
    text = textwrap.dedent(
        """\
        nodes:
          - url: https://github.com/a/First.git
        models: []
        nodes:
          - url: https://github.com/a/Second.git
            version: v1
            version: v2
        comfyui:
          ref: a
          ref: b
        """
    )
    assert problems_of(text) == [
        "duplicate key 'nodes' at line 4 (first at line 1): YAML would keep only the last one; merge the two into one",
        "duplicate key 'version' at line 7 (first at line 6): YAML would keep only the last one; merge the two into one",
        "duplicate key 'ref' at line 10 (first at line 9): YAML would keep only the last one; merge the two into one",
    ]
    (problem,) = problems_of("models: [{url: https://e.example/a, destination: vae, destination: loras}]\n")
    assert problem.startswith("duplicate key 'destination' at line 1 (first at line 1)")


def test_the_same_key_in_different_entries_is_not_a_duplicate():
    cfg = load_config_text("nodes:\n  - url: https://github.com/a/b.git\n  - url: https://github.com/a/c.git\n")
    assert [n.dir_name() for n in cfg.nodes] == ["b", "c"]


def alias_bomb() -> str:
    """~500 bytes of YAML whose aliases expand to 9**9 strings when printed."""
    lines = ["models:", "- url: &a [x,x,x,x,x,x,x,x,x]", "  destination: vae"]
    prev = "a"
    for name in "bcdefghi":
        lines += [f"- url: &{name} [{','.join(['*' + prev] * 9)}]", "  destination: vae"]
        prev = name
    return "\n".join(lines) + "\n"


def test_alias_expansion_never_reaches_a_message():
    text = alias_bomb()
    assert len(text) < 600
    started = time.monotonic()
    with pytest.raises(ConfigError) as info:
        load_config_env(text)
    assert time.monotonic() - started < 2
    assert len(str(info.value)) < 2000
    assert info.value.problems[0] == "models[0]: url: Input should be a valid string"


def test_long_values_and_keys_are_clipped_in_messages():
    url = "https://example.com/" + "a" * 100_000
    problems = problems_of(
        yaml.safe_dump({"models": [{"url": url, "destination": "/" + "b" * 100_000, "k" * 5000: 1}]})
    )
    assert len(problems) == 2
    assert all(len(p) < 600 for p in problems)
    assert all("…" in p for p in problems)
    many = problems_of(json.dumps({"models": [{"url": f"-{i}", "destination": "vae"} for i in range(200)]}))
    assert len(many) == 51
    assert many[-1] == "... and 150 more problem(s); fix these first"


def test_non_utf8_config_file_names_the_file_and_the_byte_offset(tmp_path):
    path = tmp_path / "config.yml"
    path.write_bytes(b"models:\n  - url: https://e.example/caf\xe9.bin\n    destination: vae\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.source == str(path)
    assert info.value.problems == [
        f"{path} is not UTF-8 text: byte 0xe9 at byte offset 38 (line 2) cannot be decoded; save it as UTF-8"
    ]


def test_control_characters_and_huge_numbers_are_yaml_problems_not_crashes():
    (problem,) = problems_of("models: \x01\n")
    assert problem.startswith("not valid YAML at character 9: the character #x0001 is not allowed")
    (problem,) = problems_of("models: " + "1" * 5000 + "\n")
    assert problem.startswith("not valid YAML: ")
    (problem,) = problems_of("[" * 3000 + "]" * 3000)
    assert problem == "not valid YAML for a config: it is nested too deeply"


@pytest.mark.parametrize("value", ["1" * 64, "0123", "1.5", "1.5e+10"])
def test_sha256_that_yaml_reads_as_a_number_says_to_quote_it(value):
    (problem,) = problems_of(f"models:\n  - url: https://e.example/a.bin\n    destination: vae\n    sha256: {value}\n")
    assert problem == (
        "models[0] (https://e.example/a.bin): sha256: YAML reads this unquoted value as a number, not as text "
        '(digits may already be lost, e.g. a leading 0); put it in quotes, e.g. sha256: "<64 hexadecimal digits>"'
    )
    quoted = load_config_text(
        f'models:\n  - url: https://e.example/a.bin\n    destination: vae\n    sha256: "{"1" * 64}"\n'
    )
    assert quoted.models[0].sha256 == "1" * 64


def test_other_text_fields_read_as_numbers_or_booleans_say_to_quote_them():
    (problem,) = problems_of("nodes:\n  - url: https://github.com/a/b.git\n    version: 1.10\n")
    assert problem.startswith(
        "nodes[0] (https://github.com/a/b.git): version: YAML reads this unquoted value as a number"
    )
    assert problem.endswith('put it in quotes, e.g. version: "1.10"')
    (problem,) = problems_of("comfyui:\n  ref: yes\n")
    assert (
        problem
        == 'comfyui: ref: YAML reads this unquoted value as the boolean true, not as text; put it in quotes, e.g. ref: "yes"'
    )


# ---- tokens in URL query strings (docs/config-reference.md) ----


@pytest.mark.parametrize(
    "section,url,name,fix",
    [
        ("models", "https://civitai.com/api/download/models/1?type=Model&token=SeCrEt1234", "token", "CIVITAI_TOKEN"),
        ("models", "https://huggingface.co/o/r/resolve/main/m.bin?access_token=SeCrEt1234", "access_token", "HF_TOKEN"),
        ("models", "https://files.example/m.bin?api_key=SeCrEt1234", "api_key", "CIVITAI_TOKEN (CivitAI) and HF_TOKEN"),
        ("models", "https://files.example/m.bin?apiKey=SeCrEt1234", "apiKey", "HF_TOKEN"),
        ("models", "https://files.example/m.bin?auth=SeCrEt1234", "auth", "HF_TOKEN"),
        ("models", "https://files.example/m.bin?hf_token=SeCrEt1234", "hf_token", "HF_TOKEN"),
        ("nodes", "https://github.com/org/node.git?private_token=SeCrEt1234", "private_token", "GITHUB_TOKEN"),
    ],
)
def test_tokens_in_the_query_string_are_rejected_masked_with_the_variable_to_use(section, url, name, fix):
    entry = {"url": url, "destination": "vae"} if section == "models" else {"url": url}
    (problem,) = problems_of(json.dumps({section: [entry]}))
    assert "SeCrEt1234" not in problem
    assert f"{section}[0] (" in problem and "?…): url: must not carry a token in its query string" in problem
    assert f"({name}=***)" in problem and fix in problem


@pytest.mark.parametrize("param", ["sig", "X-Amz-Signature", "X-Goog-Signature"])
def test_signed_links_are_rejected_masked(param):
    (problem,) = problems_of(one_model(url=f"https://cdn.example/m.bin?Expires=1&{param}=SeCrEt1234"))
    assert "SeCrEt1234" not in problem
    assert f"url: is a signed link ({param}=***" in problem and "use a permanent URL" in problem


def test_plain_query_parameters_are_fine_and_never_shown_in_messages():
    url = "https://civitai.com/api/download/models/12345?type=Model&format=SafeTensor"
    assert load_config_text(one_model(url=url)).models[0].url == url
    (problem,) = problems_of(one_model(url=url, destination="../x"))
    assert problem.startswith("models[0] (https://civitai.com/api/download/models/12345?…): destination:")
    (problem,) = problems_of(one_model(url="ftp://e.example/a.bin?type=x"))
    assert problem.endswith("url: must be an http(s) URL, not 'ftp://e.example/a.bin?…'")
    duplicate = json.dumps(
        {
            "models": [
                {"url": "https://a.example/m.bin", "destination": "vae"},
                {"url": url + "&x=1", "destination": "vae", "filename": "m.bin"},
            ]
        }
    )
    assert problems_of(duplicate)[0].startswith(
        "models[1] (https://civitai.com/api/download/models/12345?…): destination"
    )


# ---- CONFIG_YML: which reading failed, and where ----


@pytest.mark.parametrize(
    "value,where",
    [
        (
            "models:\n\t- url: x\n",
            "line 2, column 1: found character '\\t' that cannot start any token; indent with spaces",
        ),
        ("models: [\n  {url: a, destination: vae}\n", "line 3, column 1: expected ',' or ']'"),
    ],
    ids=["tab", "unclosed_bracket"],
)
def test_config_yml_yaml_syntax_error_keeps_its_line_and_column(value, where):
    with pytest.raises(ConfigError) as info:
        decode_config_env(value)
    (problem,) = info.value.problems
    assert problem.startswith("the value is neither a YAML mapping (models:/nodes:) nor base64 of one. Read as YAML")
    assert f"not valid YAML at {where}" in problem
    assert "Read as base64, it has characters outside the base64 alphabet" in problem
    assert problem.endswith("encode the file with `base64 -w0 config.yml`")


def test_config_yml_base64_of_gzip_names_gzip():
    with pytest.raises(ConfigError) as info:
        decode_config_env(base64.b64encode(gzip.compress(SMALL.encode())).decode())
    (problem,) = info.value.problems
    assert "it is base64 of gzip-compressed data, which CONFIG_YML does not take" in problem
    assert problem.endswith("encode the file with `base64 -w0 config.yml` (without gzip)")


def test_config_yml_base64_of_binary_names_the_byte():
    with pytest.raises(ConfigError) as info:
        decode_config_env(base64.b64encode(b"models: \xff\xfe").decode())
    assert "decodes from base64 to binary data (byte 0xff at byte offset 8 is not UTF-8)" in info.value.problems[0]


@pytest.mark.parametrize(
    "value,kind",
    [
        ("- url: https://example.com/a.safetensors\n  destination: vae\n", "a YAML list of 1 item(s)"),
        ("- a\n- b\n", "a YAML list of 2 item(s)"),
        ("[1, 2]", "a YAML list of 2 item(s)"),
        ("12345678", "a YAML number (12345678)"),
        ("true", "a YAML boolean (true)"),
        ("null", "YAML null (no value)"),
    ],
    ids=["list_of_models", "list_base64_alphabet", "flow_list", "number", "boolean", "null"],
)
def test_config_yml_that_is_a_yaml_list_or_scalar_says_what_it_is_not_binary_data(value, kind):
    """issue 20 (in passing): a YAML list was described as "decodes from base64 to binary data"."""
    with pytest.raises(ConfigError) as info:
        decode_config_env(value)
    (problem,) = info.value.problems
    assert problem.startswith(f"the value is {kind}, but a config is a YAML mapping: `models:` and `nodes:`")
    assert "binary data" not in problem and problem.endswith("encode the file with `base64 -w0 config.yml`")


def test_config_yml_that_is_one_word_says_so_without_showing_it():
    """issue 20 (in passing): a single YAML string (maybe a pasted secret) is named by its length only."""
    with pytest.raises(ConfigError) as info:
        decode_config_env("hunter22")
    (problem,) = info.value.problems
    assert "read as YAML it is one string of 8 characters" in problem and "hunter22" not in problem


def test_config_yml_base64_whose_yaml_is_broken_says_it_was_decoded():
    with pytest.raises(ConfigError) as info:
        decode_config_env(b64("models:\n\t- x\n"))
    assert info.value.source == "CONFIG_YML (decoded from base64)"
    assert info.value.problems[0].startswith("not valid YAML at line 2, column 1")


@pytest.mark.parametrize("value", ["", "  \n\t "])
def test_config_yml_empty_or_blank_is_an_error(value):
    with pytest.raises(ConfigError) as info:
        decode_config_env(value)
    assert info.value.source == "CONFIG_YML"
    assert info.value.problems == [
        "the value is empty; set it to a config.yml or its base64 (`base64 -w0 config.yml`), "
        "or unset CONFIG_YML to use $VOLUME_ROOT/config.yml"
    ]


def test_config_yml_with_duplicate_keys_is_rejected():
    with pytest.raises(ConfigError) as info:
        load_config_env("models: []\nmodels: []\n")
    assert info.value.problems[0].startswith("duplicate key 'models' at line 2 (first at line 1)")


@pytest.mark.parametrize(
    ("url", "derived"), [("https://x.org/o/r/.", "."), ("https://x.org/o/..", ".."), ("https://x.org/o/-x", "-x")]
)
def test_a_folder_name_taken_from_the_url_gets_the_checks_of_name(url, derived):
    with pytest.raises(ConfigError) as err:
        parse_config({"nodes": [{"url": url}]})
    [problem] = err.value.problems
    assert problem.startswith(f"nodes[0] ({url}): name: the folder name {derived!r} taken from the URL is not usable (")
    assert problem.endswith("); set 'name' to the folder to use under custom_nodes")
    assert parse_config({"nodes": [{"url": url, "name": "Good"}]}).nodes[0].dir_name() == "Good"


def test_a_folder_clash_is_reported_with_another_error_of_the_same_entry():
    """issue 21 (docs: "every problem is reported at once"): the clash showed only once the other error was fixed."""
    raw = {
        "nodes": [
            {"url": "https://github.com/a/Pack", "version": ""},
            {"url": "https://github.com/b/Pack"},
        ],
        "models": [
            {"url": "https://x.org/m.safetensors", "destination": "loras", "sha256": "nope"},
            {"url": "https://y.org/m.safetensors", "destination": "loras"},
        ],
    }
    with pytest.raises(ConfigError) as err:
        parse_config(raw)
    problems = err.value.problems
    assert any(p.startswith("nodes[0]") and "version" in p for p in problems), problems
    assert any(p.startswith("nodes[1]") and "custom_nodes/Pack is already used by nodes[0]" in p for p in problems)
    assert any(p.startswith("models[0]") and "sha256" in p for p in problems), problems
    assert any(
        p.startswith("models[1]") and "models/loras/m.safetensors is already used by models[0]" in p for p in problems
    )


def test_the_header_counts_every_problem_also_past_the_listed_ones(tmp_path):
    """issue 21: past 50 problems the header said 51 when there were 70."""
    cfg = tmp_path / "config.yml"
    cfg.write_text("models:\n" + "".join(f"  - {{url: 'https://x.org/{i}.safetensors'}}\n" for i in range(70)))
    done = subprocess.run(
        [sys.executable, "download_models.py", "--validate-only", "--config", str(cfg)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert f"error: {cfg} is invalid (70 problem(s)):" in done.stderr
    assert "... and 20 more problem(s)" in done.stderr
