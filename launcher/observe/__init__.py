"""What a job left behind, read back: the event ledger, goodput, stragglers, the node ledger, cluster history."""
