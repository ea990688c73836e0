//! Process runner: trees die, outputs arrive whole, timeouts fire.
