"""``edgellm-verify-signature``: check a source directory against its model-signing signature; write a stamp."""

from __future__ import annotations

import argparse

from edgellm_steps.artifacts.signatures import SignatureSpec, verify_source
from edgellm_steps.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgellm-verify-signature", description=__doc__)
    parser.add_argument("--source", required=True, help="the signed directory (a checkpoint, draft or adapter)")
    parser.add_argument("--signature", required=True, help="the signature bundle model_signing wrote")
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--public_key", help="the signer's PEM public key (offline)")
    how.add_argument("--certificate_chain", nargs="+", help="PEM certificates that root the signing certificate")
    how.add_argument("--identity", help="keyless (Sigstore, needs network): the signer's identity")
    parser.add_argument("--oidc_issuer", help="keyless: the OIDC issuer of --identity")
    parser.add_argument("--stamp", required=True, help="JSON written only when the source matches")
    args = parser.parse_args(argv)
    if (args.identity is None) != (args.oidc_issuer is None):
        parser.error("--identity and --oidc_issuer go together (keyless verification)")
    spec = SignatureSpec(
        file=args.signature,
        public_key=args.public_key,
        certificate_chain=tuple(args.certificate_chain or ()),
        identity=args.identity,
        oidc_issuer=args.oidc_issuer,
    )
    return run_cli(lambda: verify_source(args.source, spec, args.stamp))


if __name__ == "__main__":
    raise SystemExit(main())
