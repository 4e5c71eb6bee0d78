"""Encryption at rest for virtio-blk: AES-XTS-256 per 512-byte sector (xts.py) and the
encrypted disk backend built on it (encrypted_disk.py)."""
