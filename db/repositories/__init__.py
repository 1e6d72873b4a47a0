"""All database queries live here, one module per aggregate; services call these and never write SQL themselves."""
