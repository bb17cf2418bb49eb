"""Constants every stage shares."""

# Rows per block when a stage copies or fuses stored rows: bounded memory whatever the collection size.
ROW_BLOCK = 65536
