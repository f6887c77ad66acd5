"""The playground page ``csm serve`` shows at ``/``: plain HTML, CSS and JavaScript modules (package data)."""
