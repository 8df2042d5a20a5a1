"""Keys, part encryption, manifests and certificates: pure functions over PyNaCl."""
