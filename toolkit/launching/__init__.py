"""Starting the workers: the ``deepspeed`` launcher command (``launcher``), several hosts
(``nodes``) and each rank's entry point (``worker``, with the launcher/worker contract)."""
