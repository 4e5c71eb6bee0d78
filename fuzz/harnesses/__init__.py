"""One module per harness: COVERS (inventory ids or fnmatch patterns), optional setup(),
one_input(data: bytes). A harness raises only when it found a bug."""
