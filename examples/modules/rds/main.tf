terraform {
  required_providers {
    null = {
      source  = "hashicorp/null"
      version = "2.1.2"
    }
  }
}

variable "identifier" {
  type        = string
  description = "Name of the database instance"
}

variable "vpc_id" {
  type        = string
  description = "VPC the database runs in"
}

variable "engine" {
  type    = string
  default = "postgres"
}

variable "instance_class" {
  type    = string
  default = "db.t3.micro"
}

variable "master_password" {
  type      = string
  sensitive = true
  default   = "example-only-password"
}

resource "null_resource" "db" {
  triggers = {
    identifier = var.identifier
    vpc_id     = var.vpc_id
    engine     = var.engine
    class      = var.instance_class
  }
}

output "db_id" {
  value = "db-${null_resource.db.id}"
}

output "endpoint" {
  value = "${var.identifier}.rds.example.internal:5432"
}

output "connection_string" {
  value     = "postgresql://admin:${var.master_password}@${var.identifier}.rds.example.internal:5432/app"
  sensitive = true
}
