"""Stand-ins for the services the product talks to, on 127.0.0.1, for the tests and the benchmarks:
the Hugging Face Hub's dataset reads (`hub`) and its model/Space commits (`hub_commits`), S3 (moto)
behind a real bucket's latency (`s3`), and EC2's instance metadata service with its spot notice
(`imds`). Not part of the installed package."""
