"""The preserved RAM region (memmap=SIZE!OFFSET legacy pmem) used as a store."""
