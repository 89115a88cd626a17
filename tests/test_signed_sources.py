"""Signed sources: a checkpoint signed with model-signing is verified before any step reads it.

Fixtures are signed here with model-signing's own signer and a locally generated EC key (a
certificate chain from a locally made CA); then single bytes of a shard, a tokenizer file and the
config are flipped, a file is added, and the key or CA is swapped: each must be refused in one line
naming the file or the signature, and leave no stamp. One Snakemake run set shows the plan stopping at
the verification with nothing built, building once the source matches, and re-verifying when the
signature changes.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import json
from pathlib import Path

import model_signing.signing
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgellm_steps.artifacts.signatures import SignatureSpec, signature_spec, verify_source
from edgellm_steps.artifacts.sources import checkpoint_files
from edgellm_steps.errors import ConfigError, SignatureError
from edgellm_steps.models.demo import make_eagle3_draft
from edgellm_steps.workflow.planning import Planner, load_workflow_config

from .support import ONNX, WorkdirLayout, copy_checkpoint, flip_last_byte, planned_jobs, run_snakemake, scenario

STAMP = "signatures/tiny/source.json"


def make_key(path: Path) -> tuple[Path, Path]:
    """A fresh P-256 key pair as PEM files: (private, public)."""
    key = ec.generate_private_key(ec.SECP256R1())
    private, public = path.with_suffix(".key"), path.with_suffix(".pub")
    encryption = serialization.NoEncryption()
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption))
    public.write_bytes(
        key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return private, public


def sign_with_key(source: Path, signature: Path, private_key: Path) -> None:
    model_signing.signing.Config().use_elliptic_key_signer(private_key=private_key).sign(source, signature)


def _certificate(subject: str, key, issuer: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    else:
        usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
    return builder.add_extension(usage, critical=True).sign(issuer_key, hashes.SHA256())


def make_ca(directory: Path, name: str) -> tuple[Path, object]:
    """A self-signed root CA: (its PEM certificate, its key)."""
    key = ec.generate_private_key(ec.SECP256R1())
    root = directory / f"{name}.pem"
    root.write_bytes(_certificate(name, key, name, key, ca=True).public_bytes(serialization.Encoding.PEM))
    return root, key


@pytest.fixture
def signed(tmp_path, checkpoint_factory):
    """A copy of the tiny checkpoint signed with a fresh key: (source, spec, stamp path)."""
    source = copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    private, public = make_key(tmp_path / "signer")
    sign_with_key(source, tmp_path / "ckpt.sig", private)
    return source, SignatureSpec(file=str(tmp_path / "ckpt.sig"), public_key=str(public)), tmp_path / "stamp.json"


def one_line_error(source: Path, spec: SignatureSpec, stamp: Path) -> str:
    with pytest.raises(SignatureError) as caught:
        verify_source(source, spec, stamp)
    message = str(caught.value)
    assert "\n" not in message and not stamp.exists()
    return message


def test_a_signed_source_verifies_and_its_stamp_lists_every_file(signed):
    source, spec, stamp = signed
    verify_source(source, spec, stamp)
    record = json.loads(stamp.read_text())
    expected = {
        f.as_posix(): "sha256:" + hashlib.sha256((source / f).read_bytes()).hexdigest()
        for f in checkpoint_files(source)
    }
    assert record["files"] == expected and record["method"] == "public_key"
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= set(expected)
    # What no step reads is not covered: a hidden cache directory the signature does not list.
    (source / ".cache").mkdir()
    (source / ".cache" / "lock").write_text("x")
    verify_source(source, spec, stamp)


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_one_changed_byte_is_caught_naming_the_file(signed, name):
    source, spec, stamp = signed
    verify_source(source, spec, stamp)  # control: the same source passes, and leaves a stamp
    assert stamp.exists()
    flip_last_byte(source / name)
    message = one_line_error(source, spec, stamp)
    assert message.startswith(f"{source}/{name} does not match its signature {spec.file}: its content differs")
    assert message.endswith("re-download the source or re-sign it")


def test_an_added_or_removed_file_is_caught(signed):
    source, spec, stamp = signed
    (source / "extra.safetensors").write_bytes(b"\0" * 16)
    assert one_line_error(source, spec, stamp).startswith(f"{source}/extra.safetensors does not match its signature")
    (source / "extra.safetensors").unlink()
    (source / "tokenizer.json").unlink()
    assert "tokenizer.json does not match its signature" in one_line_error(source, spec, stamp)


def test_another_key_or_a_damaged_signature_is_refused(signed, tmp_path):
    source, spec, stamp = signed
    _, other = make_key(tmp_path / "other")
    wrong_key = SignatureSpec(file=spec.file, public_key=str(other))
    assert one_line_error(source, wrong_key, stamp).startswith(f"{spec.file} does not verify with public key {other}")
    # The same key and files, but one byte of the ECDSA signature over the statement flipped.
    bundle = json.loads(Path(spec.file).read_text())
    envelope = bundle["dsseEnvelope"]["signatures"][0]
    raw = bytearray(base64.b64decode(envelope["sig"]))
    raw[8] ^= 1
    envelope["sig"] = base64.b64encode(bytes(raw)).decode()
    Path(spec.file).write_text(json.dumps(bundle))
    message = one_line_error(source, spec, stamp)
    assert message.startswith(f"{spec.file} does not verify with public key") and "InvalidSignature" in message


def test_a_certificate_chain_from_a_local_ca_verifies_offline(tmp_path, checkpoint_factory):
    source = copy_checkpoint(checkpoint_factory("qwen2"), tmp_path / "ckpt")
    root, root_key = make_ca(tmp_path, "root")
    signer_key = ec.generate_private_key(ec.SECP256R1())
    private, _ = make_key(tmp_path / "unused")
    private.write_bytes(
        signer_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    leaf = tmp_path / "signer.pem"
    leaf.write_bytes(
        _certificate("signer", signer_key, "root", root_key, ca=False).public_bytes(serialization.Encoding.PEM)
    )
    model_signing.signing.Config().use_certificate_signer(
        private_key=private, signing_certificate=leaf, certificate_chain=[root]
    ).sign(source, tmp_path / "ckpt.sig")
    spec = SignatureSpec(file=str(tmp_path / "ckpt.sig"), certificate_chain=(str(root),))
    verify_source(source, spec, tmp_path / "stamp.json")
    assert json.loads((tmp_path / "stamp.json").read_text())["method"] == "certificate_chain"
    other_root, _ = make_ca(tmp_path, "other-root")  # control: a CA that did not issue the signer's certificate
    other = SignatureSpec(file=spec.file, certificate_chain=(str(other_root),))
    assert "X509StoreContextError" in one_line_error(source, other, tmp_path / "stamp.json")


def test_a_signature_names_exactly_one_method():
    assert signature_spec({"file": "s", "public_key": "k"}, "model 'm'").method == "public_key"
    with pytest.raises(ConfigError, match="names public_key and certificate_chain; give exactly one"):
        signature_spec({"file": "s", "public_key": "k", "certificate_chain": ["c"]}, "model 'm'")
    with pytest.raises(ConfigError, match="names none"):
        signature_spec({"file": "s"}, "model 'm'")
    with pytest.raises(ConfigError, match="keyless verification needs both identity and oidc_issuer"):
        signature_spec({"file": "s", "identity": "me@example.com"}, "model 'm'")


def test_every_reader_of_a_signed_part_waits_for_its_stamp(tmp_path, checkpoint_factory, monkeypatch):
    """Planning only: the source's, the draft's and an adapter's readers take their stamps; a missing file
    is one line at planning."""
    base = checkpoint_factory("qwen2")
    copy_checkpoint(base, tmp_path / "ckpt")
    make_eagle3_draft(tmp_path / "draft", base)
    for name in ("ckpt.sig", "draft.sig", "key.pub"):
        (tmp_path / name).write_text("{}")
    signature = {"file": "ckpt.sig", "public_key": "key.pub"}
    config = {
        "models": {
            "tiny": {
                "source": "ckpt",
                "signature": signature,
                "draft": {"source": "draft", "signature": {**signature, "file": "draft.sig"}},
            }
        }
    }
    monkeypatch.chdir(tmp_path)
    inputs = Planner(load_workflow_config(config)).inputs
    readers = inputs.export_llm("tiny", "fp16")["source"]
    content = [str(p) for p in sorted(Path(".edgellm/sources/tiny").rglob("*.xxh3"))]
    assert sorted(readers) == sorted([*content, STAMP])
    assert inputs.export_draft("tiny", "fp16") == {
        "draft": [
            *[str(p) for p in sorted(Path(".edgellm/drafts/tiny").rglob("*.xxh3"))],
            "signatures/tiny/draft.json",
        ],
        "source": [".edgellm/sources/tiny/config.json.xxh3", STAMP],
    }
    assert inputs.verify_signature("tiny", "source") == {
        "signature": "ckpt.sig",
        "trust": ["key.pub"],
        "content": content,
    }
    assert inputs.signature_options("tiny", "draft") == "--public_key key.pub"
    (tmp_path / "key.pub").unlink()
    with pytest.raises(ConfigError, match=r"^model 'tiny' source signature: public_key 'key.pub' does not exist"):
        Planner(load_workflow_config(config)).inputs.export_llm("tiny", "fp16")


def _signed_workdir(workdir: Path, base: Path) -> None:
    private, _ = make_key(workdir / "signer")
    sign_with_key(workdir / "ckpt", workdir / "ckpt.sig", private)


WORKDIR = WorkdirLayout(
    config=scenario("signed", model="tiny", source="ckpt", signature="ckpt.sig", public_key="signer.pub"),
    extras=_signed_workdir,
)


@pytest.mark.workflow
def test_a_tampered_source_stops_the_plan_and_builds_nothing(workdir):
    shard = workdir / "ckpt" / "model.safetensors"
    flip_last_byte(shard)
    failed = run_snakemake(workdir, ONNX, check=False)
    assert failed.returncode != 0 and "Error in rule verify_signature" in failed.output, failed.output
    log = (workdir / "logs/verify_signature/tiny/source.log").read_text()
    errors = [line for line in log.splitlines() if line.startswith("error")]
    assert "Traceback" not in log and errors == [
        f"error: {shard.resolve()} does not match its signature ckpt.sig: its content differs from the signed "
        "digest; re-download the source or re-sign it"
    ]
    assert not (workdir / "onnx").exists() and not (workdir / STAMP).exists()

    flip_last_byte(shard)  # the signed bytes again: verified, the export free to run
    run_snakemake(workdir, STAMP)
    files = json.loads((workdir / STAMP).read_text())["files"]
    assert files.keys() == {f.as_posix() for f in checkpoint_files(shard.parent)}

    sign_with_key(workdir / "ckpt", workdir / "ckpt.sig", workdir / "signer.key")  # a new signature, same files
    plan = run_snakemake(workdir, "-n", ONNX)
    assert planned_jobs(plan.output) == {"verify_signature": 1, "export_llm": 1}
    assert "Updated input files: ckpt.sig" in plan.output
