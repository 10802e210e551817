"""The plane's Streamlit app: `streamlit run dashboards/app.py [-- --api-url URL]` (or `controlplane ui`).

It reads only the plane's REST API: CONTROLPLANE_API_URL (default http://127.0.0.1:8080), and
CONTROLPLANE_API_TOKEN for the Apply / Dismiss buttons. The pages live in controlplane/ui/.
"""

from __future__ import annotations

import argparse
import sys

from controlplane.ui.nav import main

_parser = argparse.ArgumentParser(prog="dashboards/app.py", add_help=False)
_parser.add_argument("--api-url", default=None)
main(api_url=_parser.parse_known_args(sys.argv[1:])[0].api_url)
