"""The command lines: ``keymgmt`` (:mod:`.client`), ``keymgmt-server`` (:mod:`.server`)
and the demo behind ``make demo`` (:mod:`.demo`)."""

__all__: list[str] = []
