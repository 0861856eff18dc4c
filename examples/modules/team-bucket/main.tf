# A team's bucket, in the team's network.
terraform {
  required_providers {
    testcloud = { source = "infrakitchen.test/ik/testcloud", version = "~> 0.1" }
  }
}

variable "name" {
  type = string
}

variable "network_id" {
  type = string
}

resource "testcloud_bucket" "this" {
  name       = var.name
  network_id = var.network_id
}

output "url" {
  value = testcloud_bucket.this.url
}
