# A team's network in the test cloud (tests/testcloud): its id and gateway are
# the cloud's, wired into the team's database and bucket.
terraform {
  required_providers {
    testcloud = { source = "infrakitchen.test/ik/testcloud", version = "~> 0.1" }
  }
}

variable "name" {
  type = string
}

variable "cidr" {
  type    = string
  default = "10.40.0.0/16"
}

resource "testcloud_network" "this" {
  name = var.name
  cidr = var.cidr
}

output "network_id" {
  value = testcloud_network.this.id
}

output "gateway" {
  value = testcloud_network.this.gateway
}
