"""What the project's own tests share: helpers, emulators, stand-ins and fakes (never test files)."""
