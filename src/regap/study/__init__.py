"""End-to-end runs that orchestrate the other packages: `regap demo` (the tour), its figures and
the HTML report; the home of the coming `regap study`."""
