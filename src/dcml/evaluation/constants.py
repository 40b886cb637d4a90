"""Constants shared by the rank engine and its compiled kernels."""

NO_GROUP = -1  # a query group id meaning "no groups": nothing is excluded by group
COLUMN_CHUNK = 1024  # columns per thread in the transposed (symmetric) pass: 4 KB of each tile row
