"""`tether serve`: watch a video as it is generated and steer it live from a browser.

`create_app(pipeline)` builds the FastAPI app (tether/serve/app.py); the page
it serves is tether/serve/page.html. The wire protocol is documented in app.py.
"""

from .app import create_app

__all__ = ["create_app"]
