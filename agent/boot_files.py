"""Names of what the last full apply leaves for the boot path (see boot.py, kernel.py)."""

BOOT_RULESET = "boot.nft"  # the ruleset in force, without exceptions
BOOT_META = "boot.json"  # the profile and config digest it was made for
