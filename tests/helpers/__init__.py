"""Test helpers, shared by the test files (imported as `helpers.*`, never from a test file)."""
