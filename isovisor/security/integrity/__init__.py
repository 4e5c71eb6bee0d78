"""VMM and platform integrity: the signed code manifest (manifest.py), the host's
measurements (measurements.py), the replayable event log (eventlog.py), the signed launch
policy (policy.py), the launch gate that checks all of them against the TPM before every
VM launch (gate.py), and TPM quotes with their offline verifier (attestation.py).
docs/SECURITY.md describes the chain of trust and what each check proves.
"""
