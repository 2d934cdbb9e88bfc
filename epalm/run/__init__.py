"""The run directory: its layout, the adapter export, resumable checkpoints and their manifests, which one
to resume from, and the lock that keeps one training per directory."""
