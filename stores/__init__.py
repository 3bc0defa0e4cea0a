"""Redis stores: key layout, the Lua scripts, the change buffer, batch records, dead
letters, the shared rate budget's state, counters. Depends only on `core`."""
