"""Web UI scraping (static and browser): not built yet, see the scrape adapter issue."""
