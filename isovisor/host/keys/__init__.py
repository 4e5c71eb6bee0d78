"""The key hierarchy of encrypted disks (issue #9): host master key -> tenant key -> disk
key. See hierarchy.py."""
