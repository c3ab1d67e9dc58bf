"""MailLaser tests."""
