"""Signed sources: a checkpoint checked against its `model-signing <https://github.com/sigstore/model-transparency>`_
signature before any step reads it.

A signature (a Sigstore bundle written by ``model_signing``) carries the digest of every file of the
signed directory. :func:`verify_source` has model-signing check the signature itself (with a public
key, a certificate chain, or keylessly through Sigstore) and then re-hash the directory and compare:
a changed byte, a file the signature does not list, or a signed file that is missing each fail, in
one line naming the file. Only on success is a small JSON stamp written; the workflow makes every
job that reads the source wait for that stamp.

What is covered: every file of the directory, followed through symlinks (a HuggingFace cache
snapshot is a tree of links), except git's files (model-signing's default), the paths the signer
chose to ignore (recorded in the signature), and hidden entries (``.cache/``) the signature does not
list, which no step reads. The signature and key files may sit inside the directory unsigned.

``model_signing`` is imported only by the step, so planning stays light.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgellm_steps.artifacts.atomic import write_if_changed
from edgellm_steps.errors import ConfigError, SignatureError

log = logging.getLogger(__name__)

#: The three ways to check a signature, as the config spells them.
PUBLIC_KEY, CERTIFICATE_CHAIN, KEYLESS = "public_key", "certificate_chain", "keyless"

_HOW = (
    "public_key: <PEM public key>, certificate_chain: [<PEM certificate>, ...], or identity: <signer> with "
    "oidc_issuer: <URL> (keyless, needs network)"
)


@dataclass(frozen=True)
class SignatureSpec:
    """A declared signature: its file and exactly one way to check it."""

    file: str
    public_key: str | None = None
    certificate_chain: tuple[str, ...] = ()
    identity: str | None = None
    oidc_issuer: str | None = None

    @property
    def method(self) -> str:
        if self.public_key is not None:
            return PUBLIC_KEY
        return CERTIFICATE_CHAIN if self.certificate_chain else KEYLESS

    @property
    def trust_files(self) -> tuple[str, ...]:
        """The local files the check trusts (a key or certificates; none for keyless)."""
        return (self.public_key,) if self.public_key is not None else self.certificate_chain

    def describe(self) -> str:
        if self.method == KEYLESS:
            return f"identity {self.identity} (issuer {self.oidc_issuer})"
        return f"{self.method.replace('_', ' ')} {', '.join(self.trust_files)}"


def signature_spec(entry: dict[str, Any] | None, where: str) -> SignatureSpec | None:
    """The ``signature`` object of a config entry, checked to name exactly one method; None when absent."""
    if entry is None:
        return None
    given = {
        PUBLIC_KEY: "public_key" in entry,
        CERTIFICATE_CHAIN: "certificate_chain" in entry,
        KEYLESS: "identity" in entry or "oidc_issuer" in entry,
    }
    methods = [method for method, present in given.items() if present]
    if len(methods) != 1:
        found = " and ".join(methods) or "none"
        raise ConfigError(f"{where} signature names {found}; give exactly one way to check it: {_HOW}")
    if given[KEYLESS] and not (entry.get("identity") and entry.get("oidc_issuer")):
        raise ConfigError(f"{where} signature: keyless verification needs both identity and oidc_issuer")
    return SignatureSpec(
        file=entry["file"],
        public_key=entry.get("public_key"),
        certificate_chain=tuple(entry.get("certificate_chain") or ()),
        identity=entry.get("identity"),
        oidc_issuer=entry.get("oidc_issuer"),
    )


def check_signature_files(spec: SignatureSpec, where: str) -> None:
    """The signature file and the key or certificates exist (checked at planning, and by the step)."""
    for key, path in (("file", spec.file), *((spec.method, p) for p in spec.trust_files)):
        if not Path(path).is_file():
            raise ConfigError(
                f"{where} signature: {key} '{path}' does not exist; fix signature.{key} in your config "
                "(paths are relative to the work directory)"
            )


def _signed_payload(signature: Path) -> dict[str, Any]:
    """The in-toto statement inside a signature bundle, unverified: it only says how the signer hashed."""
    try:
        bundle = json.loads(signature.read_text(encoding="utf-8"))
        statement = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"], validate=True))
        _signed_names(statement)  # a KeyError or TypeError unless it is model-signing's statement
        return statement
    except (OSError, ValueError, KeyError, TypeError, binascii.Error) as err:
        raise SignatureError(
            f"{signature} is not a model-signing signature ({type(err).__name__}: {err}); sign the source with "
            "model_signing (README: Signed sources) and point signature.file at the bundle it writes"
        ) from None


def _signed_names(statement: dict[str, Any]) -> dict[str, str]:
    """Signed file -> digest, from the statement (a sharded signature lists ``file:start:end`` pieces)."""
    sharded = statement["predicate"]["serialization"]["method"] == "shards"
    names: dict[str, str] = {}
    for resource in statement["predicate"].get("resources", []):
        name = re.sub(r":\d+:\d+$", "", resource["name"]) if sharded else resource["name"]
        names.setdefault(name, f"{resource.get('algorithm', '')}:{resource['digest']}")
    return names


def _hashing_config(source: Path, spec: SignatureSpec, statement: dict[str, Any]):
    """How to hash ``source`` as the signer did, following symlinks, skipping what no step reads unsigned."""
    from model_signing import hashing

    serialization = statement["predicate"]["serialization"]
    config = hashing.Config()
    if serialization["method"] == "shards":
        config.use_shard_serialization(
            hashing_algorithm=serialization["hash_type"], shard_size=serialization["shard_size"]
        )
    else:
        config.use_file_serialization(hashing_algorithm=serialization["hash_type"])
    signed = _signed_names(statement)
    unsigned = []
    for path in sorted(source.rglob("*")):
        relative = path.relative_to(source)
        if relative.as_posix() in signed or path.is_dir():
            continue
        hidden = any(part.startswith(".") for part in relative.parts)
        ours = any(path.resolve() == Path(p).resolve() for p in (spec.file, *spec.trust_files))
        if hidden or ours:
            unsigned.append(relative)
    return config.set_ignored_paths(paths=unsigned, ignore_git_paths=True).set_allow_symlinks(True)


def _verifying_config(spec: SignatureSpec):
    from model_signing import verifying

    config = verifying.Config()
    if spec.method == PUBLIC_KEY:
        return config.use_elliptic_key_verifier(public_key=spec.public_key)
    if spec.method == CERTIFICATE_CHAIN:
        return config.use_certificate_verifier(certificate_chain=spec.certificate_chain)
    return config.use_sigstore_verifier(identity=spec.identity, oidc_issuer=spec.oidc_issuer)


def _mismatch(source: Path, hashing_config, statement: dict[str, Any]) -> list[tuple[str, str]]:
    """(file, what is wrong) for each file whose digest is not the signed one, from a fresh hash of ``source``
    (called once model-signing has found a mismatch, so the statement is the verified one)."""
    sharded = statement["predicate"]["serialization"]["method"] == "shards"

    def file_of(name: str) -> str:
        return re.sub(r":\d+:\d+$", "", name) if sharded else name

    actual = {rd.identifier: rd.digest.digest_hex for rd in hashing_config.hash(source).resource_descriptors()}
    signed = {resource["name"]: resource["digest"] for resource in statement["predicate"]["resources"]}
    found: dict[str, str] = {}
    for name in sorted(actual.keys() & signed.keys()):
        if actual[name] != signed[name]:
            found.setdefault(file_of(name), "its content differs from the signed digest")
    for name in sorted(actual.keys() - signed.keys()):
        found.setdefault(file_of(name), "the signature does not list it")
    for name in sorted(signed.keys() - actual.keys()):
        found.setdefault(file_of(name), "it is signed but missing")
    return list(found.items())


def _verify(source: Path, spec: SignatureSpec, statement: dict[str, Any]) -> None:
    """model-signing's check of ``spec.file`` and of ``source`` against it; one line on failure."""
    from cryptography.exceptions import InvalidSignature

    signature, how = spec.file, spec.describe()
    failures: list[type[BaseException]] = [InvalidSignature]
    if spec.method == CERTIFICATE_CHAIN:
        from OpenSSL.crypto import X509StoreContextError

        failures.append(X509StoreContextError)
    if spec.method == KEYLESS:
        from sigstore.errors import Error as SigstoreError

        failures += [SigstoreError, OSError]
    hashing_config = _hashing_config(source, spec, statement)
    try:
        _verifying_config(spec).set_hashing_config(hashing_config).verify(source, signature)
    except ValueError as err:
        message = str(err)
        if not message.startswith("Signature mismatch"):
            raise SignatureError(
                f"{signature} does not verify with {how}: {message.strip().rstrip('.')}; check the signature's "
                f"{spec.method} in your config or re-sign the source"
            ) from None
        problems = _mismatch(source, hashing_config, statement) or [("(a file)", message)]
        (name, what), rest = problems[0], problems[1:]
        more = f" (and {', '.join(n for n, _ in rest)})" if rest else ""
        raise SignatureError(
            f"{source}/{name} does not match its signature {signature}: {what}{more}; "
            "re-download the source or re-sign it"
        ) from None
    except tuple(failures) as err:
        detail = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        if spec.method == KEYLESS:
            raise SignatureError(
                f"{signature} does not verify with {how}: {detail}; keyless verification needs network access to "
                "Sigstore (its trust root and log): run the job where it has network, or sign with a key instead"
            ) from None
        raise SignatureError(
            f"{signature} does not verify with {how}: {detail}; the signature is damaged or was made with another "
            "key: check the signature settings or re-sign the source"
        ) from None


def verify_source(source: str | Path, spec: SignatureSpec, stamp: str | Path) -> dict[str, Any]:
    """Verify ``source`` against ``spec`` and write ``stamp`` (JSON) only when it matches.

    A stamp from an earlier verification is removed first: a failed check never leaves one behind.
    Raises :class:`SignatureError` in one line naming the file that does not match.
    """
    source, stamp = Path(source), Path(stamp)
    stamp.unlink(missing_ok=True)
    check_signature_files(spec, f"source {source}")
    if not source.is_dir():
        raise SignatureError(f"source {source} is not a directory; point source at the signed checkpoint directory")
    statement = _signed_payload(Path(spec.file))
    log.info("verifying %s against %s with %s", source, spec.file, spec.describe())
    _verify(source, spec, statement)
    record = {
        "source": str(source),
        "signature": spec.file,
        "signature_sha256": hashlib.sha256(Path(spec.file).read_bytes()).hexdigest(),
        "method": spec.method,
        "verified_with": spec.describe(),
        "hash_type": statement["predicate"]["serialization"]["hash_type"],
        "files": _signed_names(statement),
    }
    write_if_changed(stamp, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())
    log.info("%s matches its signature: %d files verified", source, len(record["files"]))
    return record
