# The vendored peer files are run by tests/test_peer_suites.py through tests/peers/shim.py,
# never collected on their own (they import CUDA extensions this machine does not have).
collect_ignore_glob = ["*"]
