"""The data path, importable on its own: the shard format, finding shards, which samples each rank
reads, the DALI graphs and loader, the torchvision baseline, preprocessing, `make_loader`.
Imports only the shared modules at the top of the package (errors, s3, retry, seeding)."""
