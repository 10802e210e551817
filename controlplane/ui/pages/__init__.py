"""One module per page; each exposes `render(ctx)` and draws below the title the app has already set."""
