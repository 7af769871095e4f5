"""Webhooks: registered endpoints and which events go where (`endpoints`), the URLs a
webhook may reach (`targets`), and delivery with its process (`delivery`)."""
