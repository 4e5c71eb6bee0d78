"""Developer tools: fetch Debian's stock kernel for guests, build a test initramfs."""
