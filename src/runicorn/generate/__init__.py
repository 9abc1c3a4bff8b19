"""Server side: scan an experiments root and publish its manifest atomically."""
